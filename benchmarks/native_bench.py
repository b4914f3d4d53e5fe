"""Where the compiled chain kernel wins: each of auto's inference paths forced on the same
ensemble, in one process, in interleaved rounds (``vensemble._timing``, as the suite times:
medians; ratios are medians of per-round ratios against the vectorized path, the fused
program at once).

    .venv/bin/python benchmarks/native_bench.py              # 21 rounds, no_grad, float32
    .venv/bin/python benchmarks/native_bench.py --rounds 7

Paths: "native" (``backends.native``: one C kernel for the whole Linear/activation chain),
"blocked" (the fused program on blocks of members, offered from 32 members), "vectorized"
(the fused program on all members at once) and the loop. Every path is checked against the
loop first.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
from torch import nn

import vensemble as ve
from vensemble._bench_workloads import mlp as workload_mlp
from vensemble._timing import interleaved_samples
from vensemble.backends._call import Call
from vensemble.backends.blocked import Unblockable, blocked_forward
from vensemble.backends.fused import fused_forward
from vensemble.backends.loop import loop_forward
from vensemble.backends.native import kernel_library, native_forward


def mlp(*dims: int) -> Callable[[], nn.Module]:
    """The suite's MLP (``Linear``/``ReLU``) of these widths, as a member factory."""
    return functools.partial(workload_mlp, dims)


# (name, member factory, members, input shape (shared by all members))
WORKLOADS: list[tuple[str, Callable[[], nn.Module], int, tuple[int, ...]]] = [
    ("1000 x MLP 8-32-32-1, batch 128", mlp(8, 32, 32, 1), 1000, (128, 8)),
    ("100 x MLP 16-64-64-1, batch 32", mlp(16, 64, 64, 1), 100, (32, 16)),
    ("10 x MLP 784-128-128-10, batch 64", mlp(784, 128, 128, 10), 10, (64, 784)),
    ("10 x critic 23-256-256-1, batch 256", mlp(23, 256, 256, 1), 10, (256, 23)),
    ("10 x critic 23-256-256-1, batch 1 (acting)", mlp(23, 256, 256, 1), 10, (1, 23)),
    ("10 x critic 23-256-256-1, batch 8 (8 envs)", mlp(23, 256, 256, 1), 10, (8, 23)),
    ("5 x policy 17-64-64-6, batch 1 (acting)", mlp(17, 64, 64, 6), 5, (1, 17)),
    ("1000 x MLP 8-32-32-1, batch 1", mlp(8, 32, 32, 1), 1000, (1, 8)),
    ("5 x MLP 64-512-512-4, batch 512", mlp(64, 512, 512, 4), 5, (512, 64)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(2)
    lib = kernel_library()
    if isinstance(lib, str):
        raise SystemExit(f"no compiled kernel here: {lib}")
    print("| workload | native ms | blocked ms | vectorized ms | loop ms | native / vectorized |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, factory, n, shape in WORKLOADS:
        torch.manual_seed(0)
        ens = ve.Ensemble.from_factory(factory, n).eval()
        x = torch.randn(*shape)
        call = Call(ens._template, n, (x,), {}, (None,))
        paths = {
            "native": lambda c=call, e=ens: native_forward(c, e._native, e._fused)[0],
            "blocked": lambda c=call, e=ens: blocked_forward(c, e._blocked, e._fused)[0],
            "vectorized": lambda c=call, e=ens: fused_forward(c, e._fused),
            "loop": lambda c=call: loop_forward(c),
        }
        with torch.no_grad():
            expected = loop_forward(call)
            for path, fn in list(paths.items()):
                try:
                    torch.testing.assert_close(fn(), expected, atol=1e-4, rtol=1e-4)
                except Unblockable:  # (fewer than 2 * MIN_BLOCK members, or one block)
                    del paths[path]
            times = interleaved_samples(paths, args.rounds, round_time=0.03)
        med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        ratio = statistics.median(a / b for a, b in zip(times["native"], times["vectorized"]))
        cells = [f"{med[p]:.3f}" if p in med else "n/a" for p in ("native", "blocked")]
        cells += [f"{med['vectorized']:.3f}", f"{med['loop']:.2f}", f"{ratio:.2f}"]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
