"""Interleaved timing: every candidate measured in the same rounds, medians reported."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer

__all__ = ["interleaved_medians", "interleaved_samples"]


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_samples(
    candidates: dict[str, Callable[[], object]], rounds: int = 7, round_time: float = 0.05
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each of ``rounds`` interleaved rounds.

    Each round times every candidate once (``torch.utils.benchmark.Timer`` at
    ``torch.get_num_threads()`` threads, the candidate repeated to fill about ``round_time``
    seconds), so machine noise hits all candidates alike and ratios can be taken per round.
    The order rotates from round to round, so no candidate always follows the same one.

    Example:
        >>> [len(v) for v in interleaved_samples({"a": lambda: None}, 3, 1e-4).values()]
        [3]
    """
    threads = torch.get_num_threads()  # Timer's default is one thread
    numbers: dict[str, int] = {}
    for name, fn in candidates.items():
        fn()  # warm-up
        _synchronize()
        timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
        estimate = timer.blocked_autorange(min_run_time=round_time / 2).median
        numbers[name] = max(1, int(round_time / max(estimate, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds if names else 0):
        # each round starts one candidate later: what a candidate leaves behind (caches, the
        # allocator's state) falls on every other candidate in turn, not always on the next
        for name in names[r % len(names) :] + names[: r % len(names)]:
            timer = Timer("fn()", globals={"fn": candidates[name]}, num_threads=threads)
            samples[name].append(timer.timeit(numbers[name]).median)
    return samples


def interleaved_medians(
    candidates: dict[str, Callable[[], object]],
    rounds: int = 7,
    round_time: float = 0.05,
) -> dict[str, float]:
    """Median seconds per call of each candidate over :func:`interleaved_samples` rounds.

    Args:
        candidates: name -> zero-argument callable.
        rounds: number of interleaved rounds.
        round_time: target seconds per candidate per round.

    Returns:
        name -> median seconds per call.
    """
    samples = interleaved_samples(candidates, rounds, round_time)
    return {name: statistics.median(values) for name, values in samples.items()}
