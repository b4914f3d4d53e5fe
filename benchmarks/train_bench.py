"""Training-step benchmarks: vensemble against hand-batched ``baddbmm`` and the per-model loop.

Run: ``.venv/bin/python benchmarks/train_bench.py [--rounds 7] [--quick] [--device cuda]``.
Each workload times one Adam step (forward, backward, step) per candidate in interleaved rounds
(medians), on two threads, and prints the ratios with the issue's targets. The last row
measures what ``fit`` adds around the steps on the digits data. With ``--device cuda`` the
models, data and the hand-batched reference live on the GPU (the timer synchronizes it).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble._timing import interleaved_medians
from vensemble.train import MemberOptimizer, fit, member_loss


def mlp(*dims: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return make


class HandBatched:
    """The hand-written reference: stacked weights, ``baddbmm`` per layer, fused Adam."""

    def __init__(self, ens: ve.Ensemble) -> None:
        sd = ens.state_dict()
        keys = sorted({k.rsplit(".", 1)[0] for k in sd}, key=int)
        self.w = [
            sd[f"{k}.weight"]
            .transpose(1, 2)
            .clone(memory_format=torch.contiguous_format)
            .requires_grad_()
            for k in keys
        ]
        self.b = [sd[f"{k}.bias"].unsqueeze(1).clone().requires_grad_() for k in keys]
        self.opt = torch.optim.Adam([*self.w, *self.b], lr=1e-3, fused=True)
        self.n = len(ens)

    def step(self, xs: Tensor, ys: Tensor) -> None:
        h = xs  # (N, B, in)
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            h = torch.baddbmm(b, h, w)  # (N, B, out)
            if i < len(self.w) - 1:
                h = h.relu()
        losses = F.cross_entropy(h.flatten(0, 1), ys.flatten(), reduction="none")
        loss = losses.view(self.n, -1).mean(dim=1).sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def step_candidates(
    make: Callable[[], nn.Module],
    n: int,
    batch: int,
    d_in: int,
    classes: int,
    loop: bool,
    device: torch.device | None = None,
) -> dict[str, Callable[[], object]]:
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, batch, d_in, generator=g).to(device)  # each member its own minibatch
    ys = torch.randint(0, classes, (n, batch), generator=g).to(device)
    out: dict[str, Callable[[], object]] = {}
    for backend in ("auto", "vmap"):
        ens = ve.Ensemble.from_factory(make, n, seed=0, backend=backend).to(device)
        opt = MemberOptimizer(torch.optim.Adam, ens, lr=1e-3)  # after the move: fused kernels

        def step(ens: ve.Ensemble = ens, opt: MemberOptimizer = opt) -> None:
            losses = member_loss(F.cross_entropy, ens(xs, in_dims=0), ys)  # (N,)
            opt.zero_grad()
            losses.sum().backward()
            opt.step()

        out[f"vensemble ({backend})"] = step
    hand = HandBatched(ens)
    out["hand-batched"] = lambda: hand.step(xs, ys)
    if loop:
        models = ens.unstack()
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]

        def loop_step() -> None:
            for i, (m, o) in enumerate(zip(models, opts)):
                o.zero_grad(set_to_none=True)
                F.cross_entropy(m(xs[i]), ys[i]).backward()
                o.step()

        out["loop"] = loop_step
    return out


def report(title: str, times: dict[str, float], targets: list[tuple[str, str, float]]) -> None:
    print(f"\n{title}")
    for name, t in times.items():
        print(f"  {name:<20} {t * 1e3:9.3f} ms")
    for kind, baseline, bound in targets:
        v = times["vensemble (auto)"]
        if kind == "within":
            ratio = v / times[baseline]
            ok = ratio <= bound
            print(
                f"  vensemble / {baseline}: {ratio:.2f}x (target <= {bound:.2f}x) {'met' if ok else 'MISSED'}"
            )
        else:
            ratio = times[baseline] / v
            ok = ratio >= bound
            print(
                f"  {baseline} / vensemble: {ratio:.1f}x faster (target >= {bound:.0f}x) {'met' if ok else 'MISSED'}"
            )


def digits_fit_overhead(rounds: int, epochs: int = 3, device: torch.device | None = None) -> None:
    from sklearn.datasets import load_digits

    device = device or torch.device("cpu")
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x, y = x[:1400].to(device), y[:1400].to(device)
    n, bs = 8, 64
    ens = ve.Ensemble.from_factory(mlp(64, 128, 128, 10), n, seed=0).to(device)
    opt = MemberOptimizer(torch.optim.Adam, ens, lr=1e-3)

    def with_fit() -> None:
        fit(
            ens,
            (x, y),
            F.cross_entropy,
            optimizer=opt,
            epochs=epochs,
            batch_size=bs,
            data_mode="shuffle",
            progress=False,
        )

    g = torch.Generator().manual_seed(0)

    def bare_steps() -> None:  # the same steps, nothing around them but the batch gather
        for _ in range(epochs):
            order = torch.rand(n, x.shape[0], generator=g).argsort(dim=1).to(device)
            for s in range(0, x.shape[0], bs):
                idx = order[:, s : s + bs]
                losses = member_loss(F.cross_entropy, ens(x[idx], in_dims=0), y[idx])
                opt.zero_grad()
                losses.sum().backward()
                opt.step()

    times = interleaved_medians(
        {"fit": with_fit, "bare steps": bare_steps}, rounds=rounds, round_time=0.3
    )
    over = times["fit"] / times["bare steps"] - 1
    print(
        f"\nfit on digits: {n} x MLP 64-128-128-10, {x.shape[0]} samples, batch {bs}, {epochs} epochs, shuffle mode"
    )
    print(
        f"  fit {times['fit'] * 1e3:.1f} ms, bare steps {times['bare steps'] * 1e3:.1f} ms: overhead {over * 100:.1f}% (target < 5%) {'met' if over < 0.05 else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="skip the 1000-member workload")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(2)
    start = time.time()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, {device} ({where}), {torch.get_num_threads()} threads, Adam steps, medians of {args.rounds} interleaved rounds"
    )
    report(
        "32 x MLP 32-64-64-10, 64 samples each",
        interleaved_medians(
            step_candidates(mlp(32, 64, 64, 10), 32, 64, 32, 10, True, device), args.rounds
        ),
        [("within", "hand-batched", 1.10), ("faster", "loop", 10)],
    )
    report(
        "tutorial: 10 x MLP 784-128-128-10, batch 64",
        interleaved_medians(
            step_candidates(mlp(784, 128, 128, 10), 10, 64, 784, 10, True, device), args.rounds
        ),
        [("within", "hand-batched", 1.10)],
    )
    if not args.quick:
        report(
            "1000 x MLP 8-32-32-2, batch 128",
            interleaved_medians(
                step_candidates(mlp(8, 32, 32, 2), 1000, 128, 8, 2, True, device),
                max(3, args.rounds // 2),
                round_time=0.2,
            ),
            [("faster", "loop", 15), ("within", "hand-batched", 1.10)],
        )
    digits_fit_overhead(args.rounds, device=device)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
