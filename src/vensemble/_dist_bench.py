"""`vensemble bench --distributed`: one training epoch of a members-heavy ensemble, sharded
over the ranks torchrun started (or one process), timed."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["add_arguments", "run_distributed_bench"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench --distributed`` options."""
    p.add_argument(
        "--distributed",
        action="store_true",
        help="time one training epoch of --members x MLP 64-256-256-10, the members sharded "
        "over the ranks torchrun started (run under torchrun; alone: one process)",
    )
    p.add_argument("--members", type=int, default=256, help="with --distributed (default 256)")
    p.add_argument("--samples", type=int, default=2048, help="with --distributed (default 2048)")
    p.add_argument("--batch-size", type=int, default=128, help="with --distributed (default 128)")
    p.add_argument(
        "--backend",
        default="fused",
        choices=("auto", "fused", "vmap", "loop"),
        help="with --distributed (default fused: auto's first call would time the loop too)",
    )
    p.add_argument(
        "--data-mode",
        default="shared",
        choices=("shared", "shuffle", "bootstrap"),
        help="with --distributed: fit's data mode (default shared)",
    )


def run_distributed_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Time one ``fit`` epoch on every rank; rank 0 prints (and writes ``--json``) the result.

    A warm-up step first (programs are built, and ``auto`` measures its paths, once per
    shape), then a timed epoch between two collectives, so the time is the slowest rank's.
    """
    from ._train_cli import make_mlp
    from .distributed import ShardedEnsemble  # lazy: `vensemble --help` needs neither
    from .train import fit

    torch.set_num_threads(args.threads)
    d_in, hidden, classes = (8, 16, 4) if args.quick else (64, 256, 10)
    members = 8 if args.quick else args.members
    samples = 64 if args.quick else args.samples
    batch = 16 if args.quick else args.batch_size
    shard = ShardedEnsemble(
        lambda: make_mlp(d_in, hidden, classes),
        members,
        seed=args.seed,
        device=args.device,
        backend=args.backend,
    )
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(samples, d_in, generator=g).to(shard.device)
    y = torch.randint(0, classes, (samples,), generator=g).to(shard.device)
    common = {"batch_size": batch, "data_mode": args.data_mode, "progress": False}
    fit(shard, (x[:batch], y[:batch]), F.cross_entropy, epochs=1, **common)  # warm-up
    comm = shard._comm
    comm.all_gather_object(None, "bench: start")
    began = time.perf_counter()
    fit(shard, (x, y), F.cross_entropy, epochs=1, **common)
    comm.all_gather_object(None, "bench: stop")
    seconds = time.perf_counter() - began
    result = {
        "workload": f"{members} x MLP {d_in}-{hidden}-{hidden}-{classes}, one epoch of "
        f"{samples} samples, batch {batch}, {args.data_mode} data, backend {args.backend}",
        "world_size": shard.world_size,
        "threads_per_rank": args.threads,
        "device": str(shard.device),
        "seconds": seconds,
        "member_samples_per_s": members * samples / seconds,
    }
    if shard.rank == 0:
        print(
            f"{result['workload']}: {shard.world_size} rank(s) x {args.threads} thread(s) on "
            f"{shard.device}: {seconds:.3f} s, {result['member_samples_per_s']:.4g} "
            "member-samples/s"
        )
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1))
    return result
