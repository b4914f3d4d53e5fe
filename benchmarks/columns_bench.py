"""What running narrow ``Linear`` layers by columns buys: the same ensemble, in one process,
forced by rows and left to choose, in alternating rounds (medians of per-round ratios).

    .venv/bin/python benchmarks/columns_bench.py              # inference (no_grad), 41 rounds
    .venv/bin/python benchmarks/columns_bench.py --rounds 11

The fused ``Linear`` measures ``y^T = W x^T`` against ``y = x W^T`` for layers of at most
``NARROW_OUTPUTS`` outputs and more rows than outputs, without autograd (see
``vensemble.backends._layers``). This script forces the rows kernel by replacing that choice
for the "rows" calls only; every call is checked against the loop over the members first.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import vensemble as ve
from vensemble.backends._layers import _Linear


def mlp(*dims: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return make


WORKLOADS: list[tuple[str, Callable[[], nn.Module], int, tuple[int, ...], int | None]] = [
    (
        "tutorial option 1: 10 x MLP 784-128-128-10, batch 64",
        mlp(784, 128, 128, 10),
        10,
        (10, 64, 784),
        0,
    ),
    ("tutorial option 2: one batch for all", mlp(784, 128, 128, 10), 10, (64, 784), None),
    ("100 x MLP 16-64-64-1, batch 32", mlp(16, 64, 64, 1), 100, (32, 16), None),
    ("1000 x MLP 8-32-32-1, batch 128", mlp(8, 32, 32, 1), 1000, (128, 8), None),
    ("10 x MLP 23-256-256-1, batch 1 (not offered)", mlp(23, 256, 256, 1), 10, (1, 23), None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    torch.set_num_threads(2)
    chooses = _Linear._in_columns
    force_rows = [False]

    def in_columns(self: _Linear, x3: Tensor, wt: Tensor, bu: Tensor | None) -> bool:
        return False if force_rows[0] else chooses(self, x3, wt, bu)

    _Linear._in_columns = in_columns  # type: ignore[method-assign]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, no_grad, {args.rounds} rounds"
    )
    with torch.no_grad():
        for name, make, n, shape, in_dims in WORKLOADS:
            ens = ve.Ensemble.from_factory(make, n, seed=0)
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            members = ens.unstack()
            expected = torch.stack([m(x[i] if in_dims == 0 else x) for i, m in enumerate(members)])

            def call(rows: bool, ens: ve.Ensemble = ens, x: Tensor = x, d: Any = in_dims) -> Tensor:
                force_rows[0] = rows
                return ens(x, in_dims=d)

            for rows in (True, False):
                torch.testing.assert_close(call(rows), expected, atol=1e-4, rtol=0)
            start = time.perf_counter()
            call(True)
            inner = max(3, int(0.02 / (time.perf_counter() - start)))
            ratios, times = [], []
            for r in range(args.rounds):
                took = {}
                for rows in (True, False) if r % 2 else (False, True):
                    start = time.perf_counter()
                    for _ in range(inner):
                        call(rows)
                    took[rows] = (time.perf_counter() - start) / inner
                ratios.append(took[False] / took[True])
                times.append(took[True])
            print(
                f"{name}: chosen / by rows {statistics.median(ratios):.3f} "
                f"(by rows {statistics.median(times) * 1e3:.3f} ms)"
            )


if __name__ == "__main__":
    main()
