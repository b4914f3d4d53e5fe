"""A workload's measured rows and what follows from them: ratios (round by round), GFLOP/s."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from ._bench_candidates import HAND, LOOP, PEAK
from ._bench_measure import Row
from ._bench_workloads import Workload

__all__ = ["HAND_BEST", "STATS", "WorkloadResult", "derived_rows"]

HAND_BEST = "hand"  # in ratios: each round's faster hand-batched baseline


STATS = ("median", "min")  # median over rounds (the report's), or the best round


@dataclass
class WorkloadResult:
    """One workload's rows, as measured (see ``measure_candidates``).

    Every statistic comes in two kinds: ``"median"`` (over the interleaved rounds; ratios are
    medians of the per-round ratios) and ``"min"`` (the best round of each candidate; ratios
    of those), which shows what a machine busy with other work hides.
    """

    workload: Workload
    rows: list[Row]

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.candidate == name), None)

    def samples(self, name: str) -> list[float] | None:
        """Seconds per call in each round; ``"hand"``: each round's faster hand-batched one."""
        if name == HAND_BEST:
            columns = [s for s in (self.samples(h) for h in HAND) if s]
            return [min(col) for col in zip(*columns)] if columns else None
        row = self.row(name)
        return row.samples if row is not None and row.time_s is not None else None

    def time(self, name: str, stat: str = "median") -> float | None:
        """Seconds per call of ``name`` (``None`` unless it ran correctly)."""
        s = self.samples(name)
        if not s:
            return None
        return min(s) if stat == "min" else statistics.median(s)

    def hand_time(self, stat: str = "median") -> float | None:
        """The faster hand-batched baseline's time (``None`` where there is none)."""
        times = [t for t in (self.time(h, stat) for h in HAND) if t is not None]
        return min(times) if times else None

    def ratio(self, num: str, den: str, stat: str = "median") -> float | None:
        """``time(num) / time(den)``: the median of per-round ratios, or of the best rounds.

        Example:
            >>> from vensemble._bench_workloads import main_workloads
            >>> w = main_workloads(quick=True)["small100"]
            >>> rows = [Row("a", "hand", "ok", 2.0, [2.0, 4.0, 2.0]),
            ...         Row("b", "hand", "ok", 1.0, [1.0, 1.0, 2.0])]
            >>> WorkloadResult(w, rows).ratio("a", "b"), WorkloadResult(w, rows).ratio("a", "b", "min")
            (2.0, 2.0)
        """
        a, b = self.samples(num), self.samples(den)
        if not a or not b:
            return None
        if stat == "min":
            return min(a) / min(b)
        return statistics.median(x / y for x, y in zip(a, b))

    def peak_gflops(self, stat: str = "median") -> float | None:
        """The square matmul's rate in this workload's rounds, GFLOP/s."""
        row, t = self.row(PEAK), self.time(PEAK, stat)
        return row.flops / t / 1e9 if row is not None and row.flops and t else None

    def peak_share(self, name: str, stat: str = "median") -> float | None:
        """This candidate's FLOP rate / the matmul's (per round, or best rounds)."""
        row = self.row(name)
        rate = self.ratio(PEAK, name, stat)
        peak = self.row(PEAK)
        if row is None or rate is None or peak is None or not peak.flops:
            return None
        return rate * (row.flops or self.workload.flops) / peak.flops


def derived_rows(result: WorkloadResult) -> list[dict[str, Any]]:
    """Each row as a dict with the ratios and rates added.

    Added keys: ``per_member_s``; ``speedup_vs_loop`` (loop time / this time, the median of
    the per-round ratios: above 1 is faster than the loop); ``time_vs_hand`` (this time / the
    faster hand-batched time, per round: 1.10 means 10% slower); ``gflops``; ``peak_share``
    (of the float32 matmul rate measured in the same rounds); and the same from each
    candidate's best round: ``min_s``, ``speedup_vs_loop_min``, ``time_vs_hand_min``,
    ``peak_share_min``.
    """
    w = result.workload
    out = []
    for row in result.rows:
        d = row.as_dict()
        name, ran = row.candidate, row.time_s is not None
        is_peak = row.family == "peak"
        flops = row.flops or w.flops
        for stat, suffix in (("median", ""), ("min", "_min")):
            t = result.time(name, stat)
            if stat == "min":
                d["min_s"] = t
            if stat == "median":
                d["per_member_s"] = t / w.n if t and not is_peak else None
                d["gflops"] = flops / t / 1e9 if t else None
            d["speedup_vs_loop" + suffix] = (
                result.ratio(LOOP, name, stat) if ran and not is_peak else None
            )
            d["time_vs_hand" + suffix] = (
                result.ratio(name, HAND_BEST, stat) if ran and not is_peak else None
            )
            d["peak_share" + suffix] = result.peak_share(name, stat) if ran else None
        out.append(d)
    return out
