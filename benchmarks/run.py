"""Run vensemble's benchmark suite (the code of `vensemble bench`), writing into benchmarks/.

    python benchmarks/run.py                    # everything, CPU, 2 threads (a few minutes)
    python benchmarks/run.py --benchmarks-md    # ... and put the results into BENCHMARKS.md
    python benchmarks/run.py --workload small100 --rounds 3

Any `vensemble bench` flag works here. Unless given, the outputs go to
benchmarks/results_<device>.json, benchmarks/results_<device>.md and benchmarks/sweep_<device>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vensemble.cli import main

HERE = Path(__file__).resolve().parent
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"
MARKER = "<!-- everything below is written by: python benchmarks/run.py --benchmarks-md -->"


def _with_default_outputs(argv: list[str]) -> tuple[list[str], dict[str, Path]]:
    device = "cpu"
    if "--device" in argv[:-1]:
        device = argv[argv.index("--device") + 1].split(":")[0]
    defaults = {
        "--json": HERE / f"results_{device}.json",
        "--markdown": HERE / f"results_{device}.md",
        "--plot": HERE / f"sweep_{device}.png",
    }
    outputs = {
        f: Path(argv[argv.index(f) + 1]) if f in argv[:-1] else p for f, p in defaults.items()
    }
    extra = [w for flag, path in defaults.items() if flag not in argv for w in (flag, str(path))]
    return ["bench", *argv, *extra], outputs


def _update_benchmarks_md(markdown: Path, plot: Path) -> None:
    """Replace what follows MARKER in BENCHMARKS.md with the new tables and the plot."""
    head = BENCHMARKS_MD.read_text().split(MARKER, 1)[0] if BENCHMARKS_MD.exists() else ""
    image = plot.resolve().relative_to(BENCHMARKS_MD.parent)
    body = (
        markdown.read_text().rstrip() + f"\n\n### Time per member against N\n\n![sweep]({image})\n"
    )
    BENCHMARKS_MD.write_text(head + MARKER + "\n\n" + body)
    print(f"[bench] updated {BENCHMARKS_MD}", file=sys.stderr)


if __name__ == "__main__":
    args = sys.argv[1:]
    update = "--benchmarks-md" in args
    argv, outputs = _with_default_outputs([a for a in args if a != "--benchmarks-md"])
    code = main(argv)
    if update:
        _update_benchmarks_md(outputs["--markdown"], outputs["--plot"])
    raise SystemExit(code)
