"""Check every candidate against the loop, then time the correct ones in interleaved rounds."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ._bench_candidates import LOOP, Candidate, first_line
from ._timing import interleaved_samples

__all__ = ["ATOL", "WARMUP_CALLS", "Row", "interleaved_samples", "measure_candidates"]

ATOL = 1e-4  # a candidate whose output differs from the loop's by more is WRONG
WARMUP_CALLS = 3  # a compiled candidate: eager/trace, compile, (CUDA graph) record


@dataclass
class Row:
    """One candidate's result on one workload.

    Attributes:
        candidate: the candidate's name.
        family: ``"baseline"``, ``"hand"``, ``"vensemble"`` or ``"peer"``.
        status: ``"ok"`` (checked and timed), ``"WRONG"`` (differs from the loop: not
            timed), ``"FAILED"`` (raised or timed out) or ``"skipped"``.
        time_s: median seconds per call over the rounds (``None`` unless ``ok``).
        samples: seconds per call in each round (ratios are taken round by round).
        max_abs_diff: largest absolute difference from the loop's output.
        warmup_s: seconds of the first call; for compiled candidates, of the first
            ``WARMUP_CALLS`` calls (the compile, CUDA-graph recording).
        compiled: whether the first calls compile.
        flops: FLOPs of one call when not the workload's (the matmul peak's).
        note: why skipped or failed, or what the candidate is.
        detail: how it ran, where the candidate can say (``Ensemble.explain()``).
    """

    candidate: str
    family: str
    status: str
    time_s: float | None = None
    samples: list[float] | None = None
    max_abs_diff: float | None = None
    warmup_s: float | None = None
    compiled: bool = False
    note: str = ""
    detail: Any = None
    flops: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Deadline(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[list[bool]]:
    """Interrupt the block after ``seconds`` (SIGALRM; only in the main thread, on POSIX).

    Yields a one-element list that is ``[True]`` once the deadline fired, since the library
    running the block (dynamo, inductor) may wrap the interruption in its own exception.
    """
    fired = [False]
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    outer = signal.getitimer(signal.ITIMER_REAL)[0] if usable else 0.0
    if not usable or seconds is None or 0 < outer <= seconds:  # an outer alarm comes first
        yield fired
        return

    def handler(signum: int, frame: Any) -> None:
        fired[0] = True
        raise _Deadline(f"timed out after {seconds:.0f} s")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # re-arm the outer alarm (pytest-timeout, say) with what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def _max_abs_diff(out: Any, expected: Tensor) -> float | None:
    """``max |out - expected|``, or ``None`` when ``out`` is not a tensor of the right shape."""
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        return None
    diff = (out.detach().to("cpu", torch.float64) - expected.to("cpu", torch.float64)).abs()
    return float(diff.max()) if diff.numel() else 0.0


def _check(c: Candidate, expected_loop: Tensor, timeout: float | None, device: torch.device) -> Row:
    """Warm ``c`` up (compiled: ``WARMUP_CALLS`` calls) and compare its output with the loop's."""
    calls = WARMUP_CALLS if c.compiled else 1
    start = time.perf_counter()
    try:
        with _deadline(timeout if c.compiled else None) as fired:
            for _ in range(calls):
                out = c.fn() if c.fn is not None else None
            _synchronize(device)
    except Exception as err:
        note = f"timed out after {timeout:.0f} s" if fired[0] else first_line(err)
        return Row(c.name, c.family, "FAILED", note=note, compiled=c.compiled)
    row = Row(c.name, c.family, "ok", warmup_s=time.perf_counter() - start, compiled=c.compiled)
    row.note, row.flops = c.note, c.flops
    if c.describe is not None:
        try:
            row.detail = c.describe()
        except Exception as err:  # diagnostics only
            row.detail = first_line(err)
    if not c.check:
        return row
    if c.to_torch is not None:
        out = c.to_torch(out)
    expected = c.expect(expected_loop) if c.expect is not None else expected_loop
    row.max_abs_diff = diff = _max_abs_diff(out, expected)
    if diff is None:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        row.status, row.note = "WRONG", f"output {got}, the loop gives {tuple(expected.shape)}"
    elif not diff <= ATOL:  # also catches NaN
        row.status, row.note = "WRONG", f"max |diff| {diff:.2e} from the loop > {ATOL:g}"
    return row


def measure_candidates(
    candidates: list[Candidate],
    rounds: int = 7,
    round_time: float = 0.05,
    compile_timeout: float | None = 300.0,
    device: torch.device | None = None,
) -> list[Row]:
    """Check each candidate against the loop (atol ``ATOL``), then time the correct ones.

    Everything runs under ``torch.no_grad()``. The candidate named ``"loop"`` is the
    reference; a candidate that disagrees with it is ``WRONG`` and not timed, one that raises
    (or whose compile outlasts ``compile_timeout`` seconds) is ``FAILED``. The correct ones are
    timed together in interleaved rounds (:func:`interleaved_samples`).

    Args:
        candidates: the loop first, then the others (see ``build_candidates``).
        rounds: interleaved timing rounds.
        round_time: seconds per candidate per round.
        compile_timeout: the longest a compiled candidate's first call may take.
        device: where the candidates run (to synchronize CUDA).

    Returns:
        One :class:`Row` per candidate, in the order given.

    Example:
        >>> from vensemble._bench_candidates import Candidate
        >>> x = torch.ones(2, 3)
        >>> rows = measure_candidates(
        ...     [Candidate("loop", "baseline", lambda: x * 2), Candidate("bad", "hand", lambda: x)],
        ...     rounds=1, round_time=0.001)
        >>> [(r.candidate, r.status) for r in rows]
        [('loop', 'ok'), ('bad', 'WRONG')]
    """
    dev = device if device is not None else torch.device("cpu")
    loop = next((c for c in candidates if c.name == LOOP), None)
    if loop is None or loop.fn is None:
        raise ValueError(f"the candidates need a runnable {LOOP!r} reference")
    rows: list[Row] = []
    runnable: dict[str, Any] = {}
    with torch.no_grad():
        expected = loop.fn()
        _synchronize(dev)
        expected = expected.detach().to("cpu")
        for c in candidates:
            if c.fn is None:
                rows.append(Row(c.name, c.family, "skipped", note=c.note))
                continue
            row = _check(c, expected, compile_timeout, dev)
            rows.append(row)
            if row.status == "ok":
                runnable[c.name] = c.fn
        samples = interleaved_samples(runnable, rounds=rounds, round_time=round_time)
    for row in rows:
        if row.candidate in samples:
            row.samples = samples[row.candidate]
            row.time_s = statistics.median(row.samples)
    return rows
