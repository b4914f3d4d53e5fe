"""Training-step benchmarks: vensemble against hand-batched ``baddbmm``, the loop and JAX.

Run: ``.venv/bin/python benchmarks/train_bench.py [--rounds 7] [--quick] [--device cuda] [--no-jax]``.
Each workload times one Adam step (forward, backward, step) per candidate in interleaved rounds
(medians), on two threads, and prints the ratios with the issue's targets. The last row
measures what ``fit`` adds around the steps on the digits data. With ``--device cuda`` the
models, data and the hand-batched reference live on the GPU (the timer synchronizes it).
Where ``jax`` and ``optax`` import, ``jax.jit(vmap(grad))`` + ``optax.adam`` runs the same
steps on XLA (CPU: its compute pool held to torch's thread count; CUDA: JAX's GPU backend),
checked against vensemble before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble._timing import interleaved_medians, interleaved_samples
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


NOTES: list[str] = []  # lines for the next report (the JAX check's outcome)
JAX = "jax jit(vmap(grad)) + optax"
JAX_ATOL = 1e-4


def _xla_threads() -> int | None:
    """Threads in XLA's CPU compute pool (named ``tf_XLAEigen``), or None off Linux."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                count += "XLAEigen" in f.read()
        except OSError:  # the thread ended meanwhile
            pass
    return count


def jax_step(ens: ve.Ensemble, xs: Tensor, ys: Tensor) -> Callable[[], object] | None:
    """The JAX peer: one ``jax.jit`` of ``vmap(value_and_grad(loss))`` over members + Adam.

    The same work as the torch candidates: ``ens``'s MLP (ReLU between the Linear layers) from
    its current weights, member ``i`` on ``xs[i]`` ``(B, in)`` with targets ``ys[i]`` ``(B,)``,
    each member's mean softmax cross-entropy, and ``optax.adam(1e-3)`` applied to the stacked
    parameters (Adam is elementwise, so that is each member's own Adam). The params and Adam
    state buffers are donated (updated in place).

    Checked before it is timed: 3 steps from ``ens``'s state, next to ``MemberOptimizer`` Adam
    on a copy of ``ens``, must give the same parameters (atol ``JAX_ATOL``) in float64, where
    both are the same math up to ~1e-13. The float32 difference (of the executable that is
    timed) is printed too but does not decide: optax computes Adam's bias correction
    ``1 - b2**t`` in float32 (``1 - float32(0.999)`` is off by 1.3e-5, relative) but the second
    moment's ``1 - b2`` in float64, so its float32 steps are ~6e-6 (relative) longer. Over
    1000 members that puts a few ReLU inputs lying within ~1e-8 of 0 on the other side, and Adam
    turns the changed gradient into an lr-sized step (1000 x 8-32-32-2: 5 members off by up to
    1e-3; with ``b1, b2 = float32(0.9), float32(0.999)``, where optax's corrections cancel, all
    within 3.5e-5). Returns None, with a note in ``NOTES`` saying why, when jax or optax does
    not import, this jaxlib has no backend for ``xs.device``, or the check fails.
    """
    # XLA's CPU client sizes its compute pool from PJRT_NPROC (default: every schedulable core),
    # read when the client is created: set it to torch's thread count before jax starts. (The
    # XLA flag --xla_cpu_multi_thread_eigen=false would make its matmuls single-threaded instead,
    # and XLA_FLAGS has no thread-count flag.) The pool is counted below to check that it held.
    os.environ.setdefault("PJRT_NPROC", str(torch.get_num_threads()))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch
    try:
        import jax
        import optax
    except ImportError as err:
        NOTES.append(f"{JAX}: skipped, {err}")
        return None
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: torch uses none
    if xs.device.type == "cpu":
        target = jax.devices("cpu")[0]
    elif jax.default_backend() == "gpu":
        target = jax.devices()[0]
    else:
        NOTES.append(f"{JAX}: skipped, this jaxlib has no GPU backend")
        return None

    def put(t: Tensor) -> Any:  # a copy in JAX's memory: torch's storage stays torch's
        return jax.device_put(np.array(t.detach().cpu().numpy(), order="C"), target)

    keys = sorted({k.rsplit(".", 1)[0] for k in ens.state_dict()}, key=int)

    def stacked(e: ve.Ensemble) -> list[tuple[Any, Any]]:  # [(W (N, in, out), b (N, out))]
        sd = e.state_dict()  # weights (N, out, in)
        return [(put(sd[f"{k}.weight"].transpose(1, 2)), put(sd[f"{k}.bias"])) for k in keys]

    tx = optax.adam(1e-3)

    def loss(params: list[tuple[Any, Any]], x: Any, y: Any) -> Any:  # one member
        h = x  # (B, in)
        for i, (w, b) in enumerate(params):
            h = h @ w + b  # (B, out)
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    def train_step(params: Any, opt_state: Any, x: Any, y: Any) -> tuple[Any, Any, Any]:
        losses, grads = jax.vmap(jax.value_and_grad(loss))(params, x, y)  # (N,), stacked
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    fn = jax.jit(train_step, donate_argnums=(0, 1))
    jys = put(ys.to(torch.int32))  # (N, B): JAX's default integers are 32-bit

    def check(dtype: torch.dtype) -> Any:
        """Each member's max |jax - vensemble| over its parameters after 3 steps, ``(N,)``."""
        ref = ve.Ensemble(ens.unstack()).to(dtype)
        opt = MemberOptimizer(torch.optim.Adam, ref, lr=1e-3)
        params = stacked(ref)
        opt_state, x = tx.init(params), xs.to(dtype)
        jx = put(x)
        for _ in range(3):
            params, opt_state, _ = fn(params, opt_state, jx, jys)
            losses = member_loss(F.cross_entropy, ref(x, in_dims=0), ys)  # (N,)
            opt.zero_grad()
            losses.sum().backward()
            opt.step()
        want = stacked(ref)
        diffs = [
            np.abs(np.asarray(got) - np.asarray(ref_t)).reshape(len(ens), -1).max(axis=1)
            for got, ref_t in zip(jax.tree.leaves(params), jax.tree.leaves(want))
        ]
        return np.max(diffs, axis=0)

    jax.config.update("jax_enable_x64", True)  # float64 arrays stay float64
    try:
        diff64 = check(torch.float64)
    finally:
        jax.config.update("jax_enable_x64", False)
    diff32 = check(torch.float32)
    over = int((diff32 > JAX_ATOL).sum())
    threads = _xla_threads() if target.platform == "cpu" else None
    pool = "" if threads is None else f", compute pool of {threads} threads"
    NOTES.append(
        f"{JAX}: XLA {target.platform}{pool}; after 3 steps max |jax - vensemble| float64"
        f" {diff64.max():.1e}, float32 {diff32.max():.1e}"
        + (
            f" ({over} of {len(ens)} members over {JAX_ATOL:.0e}, float32 only: see jax_step)"
            if over
            else ""
        )
    )
    if not diff64.max() <= JAX_ATOL:  # also catches NaN
        NOTES.append(f"{JAX}: WRONG (float64 max diff {diff64.max():.1e} > {JAX_ATOL:.0e})")
        return None
    jxs, params = put(xs), stacked(ens)  # (N, B, in), from ens's (initial) weights
    state = [params, tx.init(params)]

    def step() -> None:
        state[0], state[1], losses = fn(state[0], state[1], jxs, jys)
        jax.block_until_ready((state, losses))

    return step


def step_candidates(
    make: Callable[[], nn.Module],
    n: int,
    batch: int,
    d_in: int,
    classes: int,
    loop: bool,
    device: torch.device | None = None,
    with_jax: bool = True,
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
    jax_fn = None
    try:  # before any step: from the same initial weights
        if with_jax:
            jax_fn = jax_step(ens, xs, ys)
        else:
            NOTES.append(f"{JAX}: skipped (--no-jax)")
    except Exception as err:  # a peer's own failure (say, a jaxlib/CUDA mismatch) must not stop us
        NOTES.append(f"{JAX}: failed, {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    if jax_fn is not None:
        out[JAX] = jax_fn
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


def report(
    title: str, times: dict[str, float], targets: list[tuple[str, str, float | None]]
) -> None:
    """Times, then each target: ("within" | "faster", baseline, bound); bound None: no target."""
    print(f"\n{title}")
    width = max(20, *map(len, times))
    for name, t in times.items():
        print(f"  {name:<{width}} {t * 1e3:9.3f} ms")
    for note in NOTES:
        print(f"  ({note})")
    NOTES.clear()
    v = times["vensemble (auto)"]
    for kind, baseline, bound in targets:
        if baseline not in times:
            print(f"  {baseline} / vensemble: n/a (not timed)")
        elif bound is None:
            print(f"  {baseline} / vensemble: {times[baseline] / v:.2f}x faster (no target)")
        elif kind == "within":
            ratio = v / times[baseline]
            ok = ratio <= bound
            print(
                f"  vensemble / {baseline}: {ratio:.2f}x (target <= {bound:.2f}x) {'met' if ok else 'MISSED'}"
            )
        else:
            ratio = times[baseline] / v
            ok = ratio >= bound
            digits = 2 if bound < 2 else 1  # "1.0x faster ... MISSED" would read oddly
            print(
                f"  {baseline} / vensemble: {ratio:.{digits}f}x faster (target >= {bound:g}x) {'met' if ok else 'MISSED'}"
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

    # a difference of two close times: the median of per-round ratios over more rounds (a noisy
    # moment hits both candidates of a round alike; medians of each time apart drift by 3-5%)
    samples = interleaved_samples(
        {"fit": with_fit, "bare steps": bare_steps}, rounds=max(15, rounds), round_time=0.3
    )
    times = {name: statistics.median(values) for name, values in samples.items()}
    ratios = [f / b for f, b in zip(samples["fit"], samples["bare steps"])]
    over = statistics.median(ratios) - 1
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
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX + optax candidate")
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
            step_candidates(mlp(32, 64, 64, 10), 32, 64, 32, 10, True, device, not args.no_jax),
            args.rounds,
        ),
        [("within", "hand-batched", 1.10), ("faster", "loop", 10), ("faster", JAX, 1)],
    )
    report(
        "tutorial: 10 x MLP 784-128-128-10, batch 64",
        interleaved_medians(
            step_candidates(mlp(784, 128, 128, 10), 10, 64, 784, 10, True, device, not args.no_jax),
            args.rounds,
        ),
        [("within", "hand-batched", 1.10), ("faster", JAX, None)],
    )
    if not args.quick:
        report(
            "1000 x MLP 8-32-32-2, batch 128",
            interleaved_medians(
                step_candidates(mlp(8, 32, 32, 2), 1000, 128, 8, 2, True, device, not args.no_jax),
                max(3, args.rounds // 2),
                round_time=0.2,
            ),
            [("faster", "loop", 15), ("within", "hand-batched", 1.10), ("faster", JAX, None)],
        )
    digits_fit_overhead(args.rounds, device=device)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
