"""The issue's speed and memory targets, checked against what was measured."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._bench_candidates import HAND, LOOP
from ._bench_memory import MemoryCase
from ._bench_results import HAND_BEST, WorkloadResult

__all__ = ["DEFAULT", "DEFAULT_COMPILED", "Target", "targets"]

DEFAULT = "vensemble auto"  # the default path: Ensemble(models)
DEFAULT_COMPILED = "vensemble auto +compile"  # Ensemble(models, compile=True)
TORCH_COMPILE = "torch.compile(torch.func)"


@dataclass
class Target:
    """One target, as measured.

    Attributes:
        target: what is promised.
        measured: the measured ratio (``None`` if it could not be measured).
        goal: the bound the ratio must respect.
        at_most: ``True``: met when ``measured <= goal``; ``False``: when ``>= goal``.
        note: what the ratio is, or why it is missing.
        best: the same ratio from each candidate's best round (``None``: not applicable);
            on a busy machine it shows what the medians hide. The verdict uses ``measured``.
        met: ``None`` when not measured.
        miss: by how much it is missed (``0.25``: 25% short of the goal).

    Example:
        >>> Target("within 1.10x", 1.21, 1.10, at_most=True).verdict()
        'missed by 10%'
    """

    target: str
    measured: float | None
    goal: float
    at_most: bool
    note: str = ""
    best: float | None = None
    met: bool | None = field(init=False)
    miss: float | None = field(init=False)

    def __post_init__(self) -> None:
        m = self.measured
        if m is None or math.isnan(m):
            self.met, self.miss = None, None
            return
        self.met = m <= self.goal if self.at_most else m >= self.goal
        self.miss = None if self.met else (m / self.goal if self.at_most else self.goal / m) - 1

    def verdict(self) -> str:
        return _verdict(self.measured, self.goal, self.at_most)

    def verdict_best(self) -> str:
        return "" if self.best is None else _verdict(self.best, self.goal, self.at_most)


def _verdict(m: float | None, goal: float, at_most: bool) -> str:
    if m is None or math.isnan(m):
        return "not measured"
    if (m <= goal) if at_most else (m >= goal):
        return "met"
    return f"missed by {(m / goal if at_most else goal / m) - 1:.0%}"


def _ratio_target(
    target: str, res: WorkloadResult, num: str, den: str, goal: float, at_most: bool, note: str
) -> Target:
    """A target on ``time(num) / time(den)``, median and best-round."""
    median, best = res.ratio(num, den), res.ratio(num, den, "min")
    return Target(target, median, goal, at_most, note, best=best)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _tutorial(results: dict[str, WorkloadResult]) -> list[Target]:
    out = []
    for key, option in (("tutorial1", "option 1"), ("tutorial2", "option 2")):
        res = results.get(key)
        if res is None:
            continue
        note = (
            f"time / hand-batched; auto at {_pct(res.peak_share(DEFAULT))} of the matmul peak, "
            f"hand-batched baddbmm at {_pct(res.peak_share(HAND[0]))} (best rounds: "
            f"{_pct(res.peak_share(DEFAULT, 'min'))}, {_pct(res.peak_share(HAND[0], 'min'))})"
        )
        goal = f"1 tutorial {option}: default within 1.10x of hand-batched"
        out.append(_ratio_target(goal, res, DEFAULT, HAND_BEST, 1.10, True, note))
        if key == "tutorial2":
            goal = "1 tutorial option 2: default beats hand-batched"
            out.append(_ratio_target(goal, res, DEFAULT, HAND_BEST, 1.0, True, note))
    return out


def _small(res: WorkloadResult) -> list[Target]:
    n = res.workload.n
    return [
        _ratio_target(
            f"2 {n} small: default within 1.10x of hand-batched",
            res,
            DEFAULT,
            HAND_BEST,
            1.10,
            True,
            "time / hand-batched",
        ),
        _ratio_target(
            f"2 {n} small: default >= 10x faster than the loop",
            res,
            LOOP,
            DEFAULT,
            10.0,
            False,
            "loop time / default time",
        ),
    ]


def _tiny(res: WorkloadResult) -> list[Target]:
    n = res.workload.n
    why = "" if res.time(DEFAULT_COMPILED) is not None else "compile=True not available or failed"
    return [
        _ratio_target(
            f"3 {n} tiny: compile=True at least as fast as torch.compile(torch.func)",
            res,
            DEFAULT_COMPILED,
            TORCH_COMPILE,
            1.0,
            True,
            why or "time / compiled torch.func time",
        ),
        _ratio_target(
            f"3 {n} tiny: compile=True >= 15x faster than the loop",
            res,
            LOOP,
            DEFAULT_COMPILED,
            15.0,
            False,
            why or "loop time / compiled time",
        ),
        _ratio_target(
            f"3 {n} tiny: default (no compile) within 1.10x of hand-batched",
            res,
            DEFAULT,
            HAND_BEST,
            1.10,
            True,
            "time / hand-batched",
        ),
    ]


def _cnn(res: WorkloadResult) -> list[Target]:
    return [
        _ratio_target(
            "4 CNN: auto at most 5% slower than the loop",
            res,
            DEFAULT,
            LOOP,
            1.05,
            True,
            "auto time / loop time",
        ),
        _ratio_target(
            "4 CNN: auto >= 3x faster than torch.func vmap",
            res,
            "torch.func",
            DEFAULT,
            3.0,
            False,
            "torch.func time / auto time",
        ),
    ]


def _memory(cases: list[MemoryCase]) -> list[Target]:
    def growth(n: int, chunk: bool) -> float | None:
        for c in cases:
            if c.runner == DEFAULT and c.n == n and (c.chunk_size is not None) == chunk:
                return c.peak_growth_mb
        return None

    ns = sorted({c.n for c in cases if c.runner == DEFAULT})
    if len(ns) < 2:
        return []
    small, big = ns[0], ns[-1]
    chunked, chunked_small, full = growth(big, True), growth(small, True), growth(big, False)

    def mib(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    note = (
        f"peak growth with chunk_size: {mib(chunked)} MiB at N={big}, {mib(chunked_small)} at "
        f"N={small}; without: {mib(full)} MiB at N={big}"
    )
    floor = max(chunked_small or 0.0, 1.0)  # RSS moves in pages: a floor avoids 0/0
    return [
        Target(
            f"5 memory: with chunk_size, {big // small}x the members -> at most 2x the peak",
            chunked / floor if chunked is not None else None,
            2.0,
            True,
            note,
        ),
        Target(
            f"5 memory: chunk_size cuts the peak for {big} members at least 4x",
            full / chunked if full is not None and chunked else None,
            4.0,
            False,
            note,
        ),
    ]


def targets(results: dict[str, WorkloadResult], memory: list[MemoryCase]) -> list[Target]:
    """The issue's targets from what was measured (workloads not run give no rows).

    Ratios are medians of per-round ratios (candidates timed in the same interleaved rounds).
    """
    out = _tutorial(results)
    if (res := results.get("small100")) is not None:
        out += _small(res)
    if (res := results.get("tiny1000")) is not None:
        out += _tiny(res)
    if (res := results.get("cnn8")) is not None:
        out += _cnn(res)
    return out + _memory(memory)
