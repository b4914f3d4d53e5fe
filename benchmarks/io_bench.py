"""Save/load time and load memory of a large ensemble file, against safetensors on the same tensors.

    .venv/bin/python benchmarks/io_bench.py                  # a ~256 MB ensemble, 9 rounds
    .venv/bin/python benchmarks/io_bench.py --mb 1024 --rounds 3

Timing: every candidate runs once per round, rounds interleaved, medians reported, with an
untimed ``os.sync()`` before each call. The files live in one temporary folder next to this
script and stay hot in the page cache (all candidates alike): loads measure CPU and memory
costs, not disk reads; ``save_file`` alone leaves its data unflushed, ``vensemble.io.save``
and ``save_file + fsync`` wait for the disk. Memory: each loader runs in a fresh subprocess; "extra"
is its peak RSS (VmHWM, reset just before the load; ``getrusage`` where that cannot be reset)
minus its RSS just before the load, with the result alive.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vensemble as ve
from vensemble._io_write import write_safetensors
from vensemble.io import load, save

WIDTH, DEPTH = 1024, 4  # one member: 4 x Linear(1024, 1024), 16.8 MB in float32


def make() -> nn.Module:
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _child(kind: str, path: str, n: int) -> None:
    """Load once and print the peak extra RSS (MB) as JSON."""
    torch.set_num_threads(2)
    reset = _reset_peak()  # else getrusage: the peak since the process started
    before_kb = _status_kb("VmRSS")
    peak_before_kb = (
        _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    )
    t0 = time.perf_counter()
    if kind == "vensemble.io.load":
        result: object = load(path, make, n=n)
    elif kind == "load_file (mmap, lazy)":
        result = load_file(path)
    elif kind == "load_file + clone (owned)":
        result = {k: v.clone() for k, v in load_file(path).items()}
    else:  # "load_file(backend='pread')"
        result = load_file(path, backend="pread")
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "extra_mb": (peak_kb - before_kb) / 1024,
                "peak_before_load_mb": (peak_before_kb - before_kb) / 1024,
                "seconds": seconds,
                "alive": result is not None,
            }
        )
    )


def _rounds(
    candidates: dict[str, Callable[[], object]], rounds: int, show: bool = False
) -> dict[str, float]:
    """Median seconds of each candidate; ``os.sync()`` (untimed) before every call, so no
    candidate pays for the dirty pages another one left behind."""
    for fn in candidates.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            os.sync()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    if show:
        print({k: [round(x, 3) for x in v] for k, v in samples.items()})
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256, help="ensemble size in MB (default 256)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--samples", action="store_true", help="print every round's seconds")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    torch.set_num_threads(2)
    member_mb = DEPTH * (WIDTH * WIDTH + WIDTH) * 4 / 1e6
    n = max(1, round(args.mb / member_mb))
    ens = ve.Ensemble.from_factory(make, n, seed=0)
    # save_file takes contiguous tensors only: stacked Linear weights are in-major, so the
    # baseline gets contiguous copies made before timing (vensemble.io.save makes its own)
    tensors = {k: t.detach().contiguous() for k, t in ens.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        ours, theirs = Path(tmp) / "ours.safetensors", Path(tmp) / "theirs.safetensors"

        def save_file_fsync() -> None:
            save_file(tensors, theirs)
            _fsync(theirs)

        save_times = _rounds(
            {
                "vensemble.io.save": lambda: save(ens, ours),
                "  its writer without CRC": lambda: write_safetensors(
                    Path(tmp) / "nocrc.safetensors", tensors, {}, checksums=False
                ),
                "save_file": lambda: save_file(tensors, theirs),
                "save_file + fsync": save_file_fsync,
            },
            args.rounds,
            args.samples,
        )
        load_times = _rounds(
            {
                "vensemble.io.load": lambda: load(ours, make, n=n),
                "load_file (mmap, lazy)": lambda: load_file(theirs),
                "load_file + clone (owned)": lambda: {
                    k: v.clone() for k, v in load_file(theirs).items()
                },
                "load_file(backend='pread')": lambda: load_file(theirs, backend="pread"),
            },
            args.rounds,
            args.samples,
        )
        size_mb = ours.stat().st_size / 1e6
        memory = {}
        for kind in load_times:
            path = ours if kind == "vensemble.io.load" else theirs
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(path), str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[kind] = json.loads(out.stdout)
    print(
        f"{n} members x MLP of {DEPTH} x Linear({WIDTH}, {WIDTH}): file {size_mb:.1f} MB; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print("\nsave                               median s   vs save_file   vs save_file+fsync")
    base, durable = save_times["save_file"], save_times["save_file + fsync"]
    for k, v in save_times.items():
        print(f"  {k:32s} {v:8.3f}   {v / base:10.2f}x   {v / durable:14.2f}x")
    print("\nload                               median s   vs load_file(pread)   peak extra RSS")
    pread = load_times["load_file(backend='pread')"]
    for k, v in load_times.items():
        m = memory[k]["extra_mb"]
        print(f"  {k:32s} {v:8.3f}   {v / pread:16.2f}x   {m:7.1f} MB = {m / size_mb:.2f}x file")
    print(
        f"\n(peak RSS above the pre-load RSS before loading: "
        f"{max(m['peak_before_load_mb'] for m in memory.values()):.1f} MB at most)"
    )


if __name__ == "__main__":
    main()
