"""The benchmark's report: markdown tables (workloads, sweep, memory, targets) and the plot."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ._bench_candidates import LOOP
from ._bench_memory import MemoryCase
from ._bench_results import WorkloadResult, derived_rows
from ._bench_targets import DEFAULT, Target

__all__ = ["format_memory", "format_sweep", "format_targets", "format_workload", "save_plot"]


def _f(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def _collapse_skipped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``vensemble * +compile`` row where every backend's compiled variant was skipped
    for the same reason (the JSON keeps them all)."""
    compiled = [
        r for r in rows if r["candidate"].endswith(" +compile") and r["family"] == "vensemble"
    ]
    if len(compiled) < 2 or any(r["status"] != "skipped" for r in compiled):
        return rows
    if len({r["note"] for r in compiled}) != 1:
        return rows
    first = rows.index(compiled[0])
    dropped = {id(r) for r in compiled}
    kept = [r for r in rows if id(r) not in dropped]
    kept.insert(first, {**compiled[0], "candidate": "vensemble * +compile"})
    return kept


def _how_it_ran(rows: list[dict[str, Any]]) -> list[str]:
    """What ``explain()`` said about the paths vensemble chose (auto's choice, fused, compile)."""
    lines = []
    for d in rows:
        detail = d.get("detail")
        if not isinstance(detail, dict):
            continue
        said = [
            f"{k} {v.removesuffix('; the vectorized path:')}"
            for k, v in detail.items()
            if k in ("(auto)", "(fused)", "(compile)")
        ]
        columns = [k for k, v in detail.items() if "y^T = W x^T for" in v]
        if columns:  # narrow Linear layers that went by columns (measured)
            said.append(f"y^T = W x^T in {', '.join(columns)}")
        if said:
            lines.append(f"- {d['candidate']}: " + "; ".join(said).replace("|", "/"))
    return lines


def format_workload(result: WorkloadResult) -> str:
    """A markdown table of one workload, one row per candidate, then how vensemble ran."""
    w = result.workload
    lines = [
        f"### {w.title}",
        "",
        "| candidate | ms/call | best ms | µs/member | x loop | / hand | GFLOP/s | % peak "
        "| warm-up s | status | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    rows = derived_rows(result)
    for d in _collapse_skipped(rows):
        warm = d["warmup_s"] if d["compiled"] else None
        lines.append(
            f"| {d['candidate']} | {_f(d['time_s'], '.3f', 1e3)} | {_f(d['min_s'], '.3f', 1e3)} | "
            f"{_f(d['per_member_s'], '.2f', 1e6)} | {_f(d['speedup_vs_loop'], '.2f')} | "
            f"{_f(d['time_vs_hand'], '.2f')} | {_f(d['gflops'], '.1f')} | "
            f"{_f(d['peak_share'], '.0f', 100)} | {_f(warm, '.1f')} | {d['status']} | "
            f"{d['note'].replace('|', '/')} |"
        )
    how = _how_it_ran(rows)
    return "\n".join([*lines, *(["", *how] if how else [])])


def format_sweep(results: list[WorkloadResult]) -> str:
    """Microseconds per member for each candidate (rows) and N (columns), markdown."""
    if not results:
        return ""
    names = list(
        dict.fromkeys(r.candidate for res in results for r in res.rows if r.family != "peak")
    )
    head = "| µs per member | " + " | ".join(f"N={res.workload.n}" for res in results) + " |"
    lines = [
        f"### N sweep: {results[0].workload.title.split(', ', 1)[0].split(' x ', 1)[1]}, "
        f"batch {results[0].workload.batch}, one batch for all",
        "",
        head,
        "|---|" + "---:|" * len(results),
    ]
    for name in names:
        cells = []
        for res in results:
            row = next((r for r in res.rows if r.candidate == name), None)
            if row is None or row.status == "skipped":
                cells.append("")
            elif row.time_s is None:
                cells.append(row.status)
            else:
                cells.append(f"{row.time_s / res.workload.n * 1e6:.2f}")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_memory(cases: list[MemoryCase], device: str) -> str:
    """Peak memory growth of one call per configuration, markdown."""
    what = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS"
    lines = [
        f"### Memory: one forward call of tiny MLPs 8-32-32-1 ({what} growth, MiB)",
        "",
        "| runner | N | chunk_size | batch | peak growth MiB | output MiB | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c.runner} | {c.n} | {c.chunk_size or 'none'} | {c.batch} | "
            f"{_f(c.peak_growth_mb, '.1f')} | {_f(c.output_mb, '.1f')} | {c.error} |"
        )
    return "\n".join(lines)


def format_targets(rows: list[Target]) -> str:
    """The targets block, markdown: the verdict on the medians, and on the best rounds."""
    lines = [
        "### Targets",
        "",
        "| target | measured | goal | verdict | best rounds | verdict (best) | what |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for t in rows:
        goal = f"{'<=' if t.at_most else '>='} {t.goal:g}"
        lines.append(
            f"| {t.target} | {_f(t.measured, '.2f')} | {goal} | {t.verdict()} | "
            f"{_f(t.best, '.2f')} | {t.verdict_best()} | {t.note} |"
        )
    return "\n".join(lines)


def save_plot(results: list[WorkloadResult], path: str | Path, title: str) -> None:
    """Time per member against N (log-log), one line per candidate; written as PNG.

    Uses the matplotlib ``Figure`` API (no pyplot). ``results`` are the sweep's points (or,
    without a sweep, whatever workloads ran).
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    series: dict[str, tuple[str, list[tuple[int, float]]]] = {}
    for res in results:
        for row in res.rows:
            if row.time_s is not None and row.family != "peak":
                family, points = series.setdefault(row.candidate, (row.family, []))
                points.append((res.workload.n, row.time_s / res.workload.n * 1e6))
    styles = {"baseline": "-", "hand": "--", "vensemble": "-", "peer": ":"}
    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    palette = colormaps["tab20"]  # pairs of shades: a candidate dark, its compiled variant light
    bases = list(dict.fromkeys(name.removesuffix(" +compile") for name in series))
    for name, (family, points) in series.items():
        points.sort()
        xs, ys = zip(*points)
        base = name.removesuffix(" +compile")
        compiled = base != name
        shade = (2 * bases.index(base)) % 20 + int(compiled)
        color = "black" if name == LOOP else palette(shade)
        style = "-." if compiled else styles.get(family, "-")
        width = 2.4 if name in (LOOP, DEFAULT) else 1.3
        ax.plot(xs, ys, style, color=color, marker="o", ms=3, lw=width, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members N")
    ax.set_ylabel("µs per member per call")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    from PIL import Image  # matplotlib's own dependency

    buffer.seek(0)  # a 128-colour palette: a quarter of the bytes, for a file kept in git
    Image.open(buffer).convert("RGB").quantize(colors=128).save(path, format="png", optimize=True)
