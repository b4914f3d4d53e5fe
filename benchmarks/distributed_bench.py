"""Sharded training throughput: one epoch of a members-heavy ensemble on 1 process against 2.

Run: ``.venv/bin/python benchmarks/distributed_bench.py [--repeats 3] [--members 256]``.
Each configuration is one ``torchrun --nproc_per_node=K -m vensemble bench --distributed``
(256 x MLP 64-256-256-10, one ``fit`` epoch of 2048 synthetic samples, batch 128, the
``fused`` backend, after a warm-up step); configurations are interleaved ``--repeats`` times and the medians reported.
On a machine with C cores, K processes get C // K threads each (``--oversubscribe`` adds
K processes with C threads each); one process with C // K threads is timed too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(procs: int, threads: int, extra: list[str]) -> dict:
    """One torchrun launch; its rank 0's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "vensemble",
            "bench",
            "--distributed",
            "--threads",
            str(threads),
            "--json",
            str(out),
            *extra,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        subprocess.run(cmd, check=True, env=env, timeout=1800, capture_output=True)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--members", type=int, default=256)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-mode", default="shared", choices=("shared", "shuffle", "bootstrap"))
    p.add_argument("--backend", default="fused", choices=("auto", "fused", "vmap", "loop"))
    p.add_argument("--procs", type=int, default=2, help="processes to compare with one")
    p.add_argument("--oversubscribe", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    extra = [
        "--members",
        str(args.members),
        "--samples",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--data-mode",
        args.data_mode,
        "--backend",
        args.backend,
    ]
    # the baseline (one process on every core), one process on one core (what each of the
    # K processes gets), and K processes sharing the cores
    configs = [
        (1, cores),
        (1, max(cores // args.procs, 1)),
        (args.procs, max(cores // args.procs, 1)),
    ]
    configs = list(dict.fromkeys(configs))
    if args.oversubscribe:
        configs.append((args.procs, cores))
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    workload = ""
    for r in range(args.repeats):
        for procs, threads in configs:
            res = run(procs, threads, extra)
            times[(procs, threads)].append(res["seconds"])
            workload = res["workload"]
            print(
                f"round {r}: {procs} process(es) x {threads} thread(s): {res['seconds']:.3f} s",
                file=sys.stderr,
            )
    base = statistics.median(times[configs[0]])
    print(f"{workload}; {cores} cores; medians of {args.repeats}\n")
    print("| processes x threads | epoch (s) | member-samples/s | speed-up vs 1 process |")
    print("|---|---|---|---|")
    for procs, threads in configs:
        t = statistics.median(times[(procs, threads)])
        rate = args.members * args.samples / t
        print(f"| {procs} x {threads} | {t:.3f} | {rate:.4g} | {base / t:.2f} |")


if __name__ == "__main__":
    main()
