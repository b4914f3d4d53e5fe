"""vensemble's correctness on a GPU: every backend against the loop, training, save/load.

    PYTHONPATH=src python3 benchmarks/gpu_check.py [--device cuda] [--compile-timeout 40]

Float32 with TF32 off. For each model of the test zoo (an MLP, a CNN with BatchNorm2d in
training mode, LayerNorm + GELU, Dropout in eval mode, a TransformerEncoderLayer in eval mode)
and each of the backends fused, vmap and auto, with one input for all members and with one
per member: the outputs, the parameter gradients of the sum of the members' mean losses and
the buffers after the call, against the ``loop`` backend on the same device (atol 1e-4).
Then the CNN in eval mode without autograd, with its BatchNorms folded into their convs (the
fused program's ``ConvBatchNorm`` and auto's folded member loop). Then the MLP with ``backend="fused", compile=True`` against the loop; Adam steps through
``MemberOptimizer`` (a learning rate per member) against each member trained alone; ``fit``
on the device against ``fit`` on the CPU; and a ``save``/``load`` round trip.

Each check prints one PASS or FAIL line as soon as it is done (a failure shows its
exception's first line, and does not stop the others), then a summary; the exit code is 1
if any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble.backends._call import Call
from vensemble.backends.folded import FoldedPlan, folded_program
from vensemble.backends.loop import loop_forward

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _helpers import ZOO  # noqa: E402  (the test suite's zoo of member architectures)

ATOL = 1e-4
N = 3  # members: odd, so a member-axis mix-up cannot hide
MODELS = {  # zoo name -> the mode the members run in
    "mlp": "train",
    "cnn_bn": "train",  # BatchNorm2d: batch statistics, running stats updated per member
    "ln_gelu": "train",
    "dropout": "eval",
    "transformer": "eval",
}
BACKENDS = ("fused", "vmap", "auto")


class CheckFailed(Exception):
    pass


def max_diff(a: Tensor, b: Tensor, what: str) -> float:
    """``max |a - b|``; raises :class:`CheckFailed` when the shapes differ or it exceeds ATOL."""
    if a.shape != b.shape:
        raise CheckFailed(f"{what}: shape {tuple(a.shape)}, the reference {tuple(b.shape)}")
    diff = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
    if not diff <= ATOL:  # also NaN
        raise CheckFailed(f"{what}: max |diff| {diff:.3e} > {ATOL:g}")
    return diff


def compare_tensors(got: Mapping[str, Tensor], want: Mapping[str, Tensor], what: str) -> float:
    """The largest difference over matching names (the names must be the same)."""
    if got.keys() != want.keys():
        raise CheckFailed(f"{what}: names {sorted(got)} != the reference's {sorted(want)}")
    return max((max_diff(got[k], want[k], f"{what} {k!r}") for k in want), default=0.0)


def members(name: str, device: torch.device, n: int = N) -> list[nn.Module]:
    factory = ZOO[name][0]
    out = []
    with torch.random.fork_rng(devices=[]):
        for i in range(n):
            torch.manual_seed(i)
            m = factory().to(device)
            out.append(m.train(MODELS.get(name, "train") == "train"))
    return out


def inputs(name: str, device: torch.device, per_member: bool, batch: int = 5) -> Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        xs = [ZOO[name][1](batch) for _ in range(N if per_member else 1)]
    return (torch.stack(xs) if per_member else xs[0]).to(device)


def check_forward_backward(name: str, backend: str, per_member: bool, dev: torch.device) -> str:
    """Outputs, gradients and buffers of ``backend`` against the loop backend."""
    models = members(name, dev)
    ref = ve.Ensemble(copy.deepcopy(models), backend="loop")
    ens = ve.Ensemble(copy.deepcopy(models), backend=backend)
    x = inputs(name, dev, per_member)
    in_dims = 0 if per_member else None
    outs = []
    for e in (ref, ens):
        out = e(x, in_dims=in_dims)  # (N, B, ...)
        loss = out.float().pow(2).flatten(1).mean(1).sum()  # sum of the members' mean losses
        loss.backward()
        outs.append(out.detach())
    want = outs[0]
    diffs = [max_diff(outs[1], want, "output")]
    grads = {k: p.grad for k, p in ens.named_parameters() if p.grad is not None}
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    if not ref_grads:
        raise CheckFailed("the reference has no gradients")
    diffs.append(compare_tensors(grads, ref_grads, "grad"))
    buffers = dict(ens.named_buffers())
    if buffers:
        diffs.append(compare_tensors(buffers, dict(ref.named_buffers()), "buffer"))
    standalone = ens.member(N - 1)(x[N - 1] if per_member else x)  # the member carried out
    diffs.append(max_diff(standalone, want[N - 1], "member(N-1) output"))
    what = f"{len(grads)} grads" + (f", {len(buffers)} buffers" if buffers else "")
    return f"max |diff| {max(diffs):.1e} ({what})"


def check_folded_inference(per_member: bool, dev: torch.device) -> str:
    """Eval-mode BatchNorm folded into its conv (inference), on the device, against the loop:
    the fused program's ``ConvBatchNorm`` and auto's folded member loop, run directly."""
    models = [m.eval() for m in members("cnn_bn", dev)]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for m in models:  # running statistics far from (0, 1), so a wrong fold shows
            for name, b in m.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn_like(b))
                elif name.endswith("running_var"):
                    b.copy_(torch.rand_like(b) + 0.5)
    ref = ve.Ensemble(copy.deepcopy(models), backend="loop").eval()
    fused = ve.Ensemble(copy.deepcopy(models), backend="fused").eval()
    x = inputs("cnn_bn", dev, per_member)
    in_dims = 0 if per_member else None
    with torch.no_grad():
        want = ref(x, in_dims=in_dims)
        diffs = [max_diff(fused(x, in_dims=in_dims), want, "fused output")]
        if not fused.explain()["bn1"].startswith("fused: folded"):
            raise CheckFailed(f"the fused program did not fold bn1: {fused.explain()['bn1']}")
        call = Call(ref._template, N, (x,), {}, (in_dims,))
        program = folded_program(call, FoldedPlan())
        if program is None:
            raise CheckFailed("no folded member forward was built")
        diffs.append(max_diff(loop_forward(call, program.module), want, "folded loop output"))
    return f"max |diff| {max(diffs):.1e} (fused program and folded loop)"


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_Timeout` in the block after ``seconds`` (SIGALRM, main thread)."""

    def handler(signum: int, frame: Any) -> None:
        raise _Timeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def check_compile(dev: torch.device, timeout: float) -> str:
    """``Ensemble(..., backend="fused", compile=True)`` on the MLP against the loop."""
    models = members("mlp", dev)
    ref = ve.Ensemble(copy.deepcopy(models), backend="loop")
    ens = ve.Ensemble(copy.deepcopy(models), backend="fused", compile=True)
    x = inputs("mlp", dev, per_member=False)
    with torch.no_grad():
        want = ref(x)
        start = time.perf_counter()
        with deadline(timeout):
            outs = [ens(x) for _ in range(3)]  # eager, then compiled after the first call
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        warm = time.perf_counter() - start
    diff = max(max_diff(o, want, f"call {k + 1}") for k, o in enumerate(outs))
    said = ens.explain().get("(compile)", "explain() has no (compile) entry")
    if "warm-up" not in said:
        raise CheckFailed(f"not compiled after 3 calls: {said}")
    return f"max |diff| {diff:.1e}; 3 calls {warm:.1f} s; {said}"


def mlp_data(dev: torch.device, n_samples: int, per_member: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    lead = (N, n_samples) if per_member else (n_samples,)
    x = torch.randn(*lead, 6, generator=g)
    y = torch.randint(0, 3, lead, generator=g)
    return x.to(dev), y.to(dev)


def check_member_optimizer(dev: torch.device, steps: int = 5) -> str:
    """Adam with a learning rate per member: each member as if trained alone."""
    lrs = [1e-2, 3e-3, 3e-2][:N]
    models = members("mlp", dev)
    alone = copy.deepcopy(models)
    ens = ve.Ensemble(copy.deepcopy(models), backend="auto")
    opt = ve.MemberOptimizer(torch.optim.Adam, ens, lr=lrs)
    xs, ys = mlp_data(dev, 16, per_member=True)  # (N, B, 6), (N, B)
    for _ in range(steps):
        losses = ve.member_loss(F.cross_entropy, ens(xs, in_dims=0), ys)  # (N,)
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    for i, m in enumerate(alone):
        o = torch.optim.Adam(m.parameters(), lr=lrs[i])
        for _ in range(steps):
            o.zero_grad()
            F.cross_entropy(m(xs[i]), ys[i]).backward()
            o.step()
    diff = 0.0
    for i, m in enumerate(alone):
        trained = dict(ens.member(i).named_parameters())
        diff = max(diff, compare_tensors(trained, dict(m.named_parameters()), f"member {i}"))
    moved = max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(alone[0].parameters(), models[0].parameters())
    )
    if moved < 1e-4:
        raise CheckFailed(f"the members barely trained (max change {moved:.1e})")
    return f"{steps} Adam steps, lr {lrs}: max |diff| {diff:.1e} from training alone"


def check_fit(dev: torch.device) -> str:
    """``fit`` (shuffle mode, a seed) on ``dev`` gives what it gives on the CPU."""
    x, y = mlp_data(torch.device("cpu"), 48, per_member=False)
    trained = {}
    for where in (torch.device("cpu"), dev):
        ens = ve.Ensemble(members("mlp", where), backend="auto")
        hist = ve.fit(
            ens,
            (x.to(where), y.to(where)),
            F.cross_entropy,
            epochs=2,
            batch_size=16,
            data_mode="shuffle",
            seed=3,
            progress=False,
        )
        trained[where.type] = (ens.state_dict(), hist.train_loss)
    (sd_cpu, loss_cpu), (sd_dev, loss_dev) = trained["cpu"], trained[dev.type]
    diff = compare_tensors({k: v.cpu() for k, v in sd_dev.items()}, sd_cpu, "weights")
    diff = max(diff, max_diff(loss_dev.cpu(), loss_cpu, "train_loss"))
    return f"2 epochs, shuffle mode: max |diff| {diff:.1e} from the CPU run"


def check_save_load(dev: torch.device) -> str:
    """``save`` an ensemble on ``dev`` and ``load`` it back there: same state, same outputs."""
    factory = ZOO["cnn_bn"][0]
    ens = ve.Ensemble(members("cnn_bn", dev))
    x = inputs("cnn_bn", dev, per_member=False)
    ens(x)  # training mode: running stats move away from their initial values
    ens.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ens.safetensors"
        ve.save(ens, path)
        back = ve.load(path, factory, map_location=dev)
    back.eval()
    state, got = ens.state_dict(), back.state_dict()
    if got.keys() != state.keys():
        raise CheckFailed(f"keys {sorted(got)} != {sorted(state)}")
    for k, v in state.items():
        if got[k].device != v.device or not torch.equal(got[k], v):
            raise CheckFailed(f"{k!r}: {got[k].device} vs {v.device}, or values differ")
    with torch.no_grad():
        diff = max_diff(back(x), ens(x), "eval output")
    return f"{len(state)} tensors equal on {dev}; eval outputs max |diff| {diff:.1e}"


def run(name: str, fn: Callable[[], str], results: list[tuple[str, bool]]) -> None:
    start = time.perf_counter()
    try:
        said, ok = fn(), True
    except Exception as err:
        lines = str(err).strip().splitlines()
        said, ok = f"{type(err).__name__}: {lines[0] if lines else ''}"[:300], False
        if not isinstance(err, CheckFailed):
            where = traceback.extract_tb(err.__traceback__)[-1]
            said += f" (at {Path(where.filename).name}:{where.lineno})"
    took = time.perf_counter() - start
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {said} [{took:.1f} s]", flush=True)
    results.append((name, ok))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu (to try it)")
    p.add_argument("--compile-timeout", type=float, default=40.0, help="seconds (default 40)")
    p.add_argument("--no-compile", action="store_true", help="skip the compile check")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # full float32: the loop is the reference
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(dev)
    else:
        name = "CPU"
    print(f"gpu_check: torch {torch.__version__}, {dev} ({name}), atol {ATOL:g}", flush=True)
    results: list[tuple[str, bool]] = []
    start = time.perf_counter()
    for model in MODELS:
        for backend in BACKENDS:
            for per_member in (False, True):
                feed = "per-member input" if per_member else "shared input"
                check = functools.partial(check_forward_backward, model, backend, per_member, dev)
                run(f"{model} ({MODELS[model]}) {backend}, {feed}", check, results)
    for per_member in (False, True):
        feed = "per-member input" if per_member else "shared input"
        check = functools.partial(check_folded_inference, per_member, dev)
        run(f"cnn_bn (eval, no_grad) BatchNorm folded, {feed}", check, results)
    run("MemberOptimizer(Adam, lr per member)", lambda: check_member_optimizer(dev), results)
    run("fit on the device vs the CPU", lambda: check_fit(dev), results)
    run("save/load round trip", lambda: check_save_load(dev), results)
    if not args.no_compile:
        run(
            "mlp fused compile=True",
            lambda: check_compile(dev, args.compile_timeout),
            results,
        )
    failed = [n for n, ok in results if not ok]
    took = time.perf_counter() - start
    verdict = "ALL PASS" if not failed else f"{len(failed)} FAILED: " + "; ".join(failed)
    print(
        f"gpu_check summary: {len(results) - len(failed)}/{len(results)} passed in "
        f"{took:.0f} s on {dev}: {verdict}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
