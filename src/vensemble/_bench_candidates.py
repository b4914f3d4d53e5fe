"""The benchmark's candidates: the loop, torch.func, hand-batched GEMMs and vensemble's backends."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ._bench_workloads import Workload
from .backends import BACKENDS
from .ensemble import Ensemble

__all__ = [
    "HAND",
    "LOOP",
    "PEAK",
    "Candidate",
    "Options",
    "build_candidates",
    "first_line",
    "hand_batched_mlp",
    "peak_candidate",
    "stacked_linears",
]

LOOP = "loop"  # the name of the baseline every candidate is checked against
HAND = ("hand baddbmm", "hand wide-GEMM")  # the hand-batched baselines: the faster one counts
PEAK = "matmul peak"  # a square float32 torch.mm, timed in the same rounds as the candidates


@dataclass
class Options:
    """How candidates are built.

    Attributes:
        device: where members and inputs live.
        compile: build the compiled candidates (``torch.compile`` of the torch.func recipe,
            vensemble with ``compile=True``).
        compile_mode: ``mode`` for ``torch.compile`` (e.g. ``"reduce-overhead"`` for CUDA
            graphs); ``None`` is torch's default.
        peers: build the peer libraries' candidates when they import.
        compile_backends: the vensemble backends that get a compiled candidate (``None``:
            all of them); the compiled torch.func baseline is built whenever ``compile`` is.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    compile: bool = True
    compile_mode: str | None = None
    peers: bool = True
    compile_backends: tuple[str, ...] | None = None


@dataclass
class Candidate:
    """One way to compute a workload's call.

    Attributes:
        name: short label (table rows, plot legend).
        family: ``"baseline"``, ``"hand"``, ``"vensemble"`` or ``"peer"``.
        fn: the call, with every input already bound; ``None`` when skipped.
        compiled: the first call compiles (its time is reported as warm-up).
        expect: maps the loop's ``(N, B, ...)`` output to what ``fn`` returns (``None``: the
            loop's output itself).
        to_torch: turns ``fn``'s output into a CPU tensor for the check (``None``: it is one).
        note: shown beside the row; for a skipped candidate, why.
        describe: after the first call, says how it ran (``Ensemble.explain``), for the JSON.
        check: compare the output with the loop's (``False`` only for the matmul peak).
        flops: FLOPs of one call when not the workload's (the matmul peak's).
    """

    name: str
    family: str
    fn: Callable[[], Any] | None
    compiled: bool = False
    expect: Callable[[Tensor], Tensor] | None = None
    to_torch: Callable[[Any], Tensor] | None = None
    note: str = ""
    describe: Callable[[], Any] | None = None
    check: bool = True
    flops: float | None = None


def _skipped(name: str, family: str, why: str) -> Candidate:
    return Candidate(name, family, None, note=why)


def first_line(err: BaseException) -> str:
    """``"TypeName: first line of the message"``, at most 160 characters."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:160]


def stacked_linears(models: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """Each ``nn.Linear`` (in module order) as ``(W, b)``: ``W (N, in, out)``, ``b (N, 1, out)``.

    Example:
        >>> ws = stacked_linears([nn.Linear(3, 2) for _ in range(4)])
        >>> ws[0][0].shape, ws[0][1].shape
        (torch.Size([4, 3, 2]), torch.Size([4, 1, 2]))
    """
    per_member = [[m for m in model.modules() if isinstance(m, nn.Linear)] for model in models]
    out = []
    for k in range(len(per_member[0])):
        w = torch.stack([layers[k].weight.detach().t() for layers in per_member]).contiguous()
        b = torch.stack([layers[k].bias.detach() for layers in per_member]).unsqueeze(1)
        out.append((w, b))  # (N, in, out), (N, 1, out)
    return out


def hand_batched_mlp(
    layers: list[tuple[Tensor, Tensor]], x: Tensor, shared: bool, wide: bool = False
) -> Tensor:
    """The MLP (``Linear``, ``ReLU``, ..., ``Linear``) for all members written by hand.

    Args:
        layers: from :func:`stacked_linears`.
        x: ``(N, B, in)`` (one batch per member) or ``(B, in)`` (``shared``).
        shared: every member sees ``x``.
        wide: with a shared input, compute the first layer as one ``(B, in) @ (in, N * out)``
            GEMM instead of ``baddbmm`` over an expanded input.

    Returns:
        ``(N, B, out)``.

    Example:
        >>> layers = stacked_linears([nn.Linear(3, 2) for _ in range(4)])
        >>> hand_batched_mlp(layers, torch.randn(5, 3), shared=True, wide=True).shape
        torch.Size([4, 5, 2])
    """
    n = layers[0][0].shape[0]
    h = x
    for k, (w, b) in enumerate(layers):
        if k == 0 and shared and wide:
            d_in, d_out = w.shape[1], w.shape[2]
            w_cat = w.permute(1, 0, 2).reshape(d_in, n * d_out)  # (in, N * out)
            h = torch.addmm(b.reshape(n * d_out), x, w_cat)  # (B, N * out)
            h = h.view(x.shape[0], n, d_out).transpose(0, 1)  # (N, B, out)
        elif k == 0 and shared:
            h = torch.baddbmm(b, x.expand(n, *x.shape), w)  # (N, B, out)
        else:
            h = torch.baddbmm(b, h, w)  # (N, B, out)
        if k < len(layers) - 1:
            h = torch.relu(h)
    return h


def _hand_candidates(w: Workload, models: list[nn.Module], x: Tensor) -> list[Candidate]:
    if w.widths is None:
        return [_skipped(HAND[0], "hand", "n/a: not an MLP (the fused backend is the hand path)")]
    layers = stacked_linears(models)
    lead = x.shape[: 2 if w.per_member else 1]
    d_in = w.widths[0]
    shared = not w.per_member

    # the samples flattened inside the timed call, as every other candidate (and the model's
    # own forward) does with the same input
    def hand(wide: bool) -> Callable[[], Tensor]:
        return lambda: hand_batched_mlp(layers, x.reshape(*lead, d_in), shared, wide)

    out = [Candidate(HAND[0], "hand", hand(False))]
    if shared:
        out.append(Candidate(HAND[1], "hand", hand(True)))
    return out


def _torch_func_candidates(
    w: Workload, models: list[nn.Module], x: Tensor, opts: Options
) -> list[Candidate]:
    """The tutorial's recipe: stacked state, a base module on "meta", functional_call + vmap."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    in_dims = (0, 0, 0 if w.per_member else None)

    def fmodel(p: dict[str, Tensor], b: dict[str, Tensor], inp: Tensor) -> Tensor:
        return functional_call(base, (p, b), (inp,))

    def recipe(p: dict[str, Tensor], b: dict[str, Tensor], inp: Tensor) -> Tensor:
        return vmap(fmodel, in_dims=in_dims)(p, b, inp)

    out = [Candidate("torch.func", "baseline", lambda: recipe(params, buffers, x))]
    name = "torch.compile(torch.func)"
    if not opts.compile:
        out.append(_skipped(name, "baseline", "compile skipped (--quick or --no-compile)"))
        return out
    compiled: list[Callable[..., Tensor]] = []  # torch.compile on first call: the warm-up

    def run_compiled() -> Tensor:
        if not compiled:
            compiled.append(torch.compile(recipe, mode=opts.compile_mode))
        return compiled[0](params, buffers, x)

    out.append(Candidate(name, "baseline", run_compiled, compiled=True))
    return out


def _ensemble_kwargs(compile_mode: str | None) -> dict[str, Any]:
    """``compile=True``, or ``compile={"mode": compile_mode}`` (torch.compile's options)."""
    return {"compile": {"mode": compile_mode} if compile_mode is not None else True}


def _vensemble_candidates(
    w: Workload, models: list[nn.Module], x: Tensor, opts: Options
) -> list[Candidate]:
    """Every backend in ``vensemble.backends.BACKENDS``, eager and (when it builds) compiled.

    Only the backends in ``opts.compile_backends`` (``None``: all) get a compiled candidate;
    the others' is skipped with a note.
    """
    out = []
    variants: list[tuple[str, dict[str, Any]]] = [("", {})]
    if opts.compile:
        variants.append((" +compile", _ensemble_kwargs(opts.compile_mode)))
    chosen = BACKENDS if opts.compile_backends is None else opts.compile_backends
    for backend in BACKENDS:
        for suffix, kwargs in variants:
            name = f"vensemble {backend}{suffix}"
            if kwargs and backend not in chosen:
                why = f"compile not requested (--compile-backends {','.join(chosen)})"
                out.append(_skipped(name, "vensemble", why))
                continue
            try:
                ens = Ensemble(models, backend=backend, **kwargs).to(opts.device)
            except Exception as err:  # e.g. compile=True not supported by this version
                out.append(_skipped(name, "vensemble", f"not built: {first_line(err)}"))
                continue
            ens.train(not w.eval_mode)
            call = _bind(ens, x, w.per_member)
            explain = getattr(ens, "explain", None)
            out.append(Candidate(name, "vensemble", call, compiled=bool(kwargs), describe=explain))
    if not opts.compile:
        out.append(
            _skipped(
                "vensemble * +compile", "vensemble", "compile skipped (--quick or --no-compile)"
            )
        )
    return out


def _bind(ens: Ensemble, x: Tensor, per_member: bool) -> Callable[[], Any]:
    if per_member:
        return lambda: ens(x, in_dims=0)
    return lambda: ens(x)


_PEAK_OPERANDS: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor]] = {}


def peak_candidate(device: torch.device, size: int) -> Candidate:
    """A square ``(size, size) @ (size, size)`` float32 ``torch.mm``: this machine's matmul rate.

    Timed in the same interleaved rounds as a workload's candidates, so each round's share of
    the peak compares like with like on a busy machine. The operands are made once per
    device and size (the most recent pair is kept).
    """
    key = (str(device), size)
    if key not in _PEAK_OPERANDS:  # made once: 8192x8192 normals take seconds on one core
        _PEAK_OPERANDS.clear()
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=gen).to(device)
        b = torch.randn(size, size, generator=gen).to(device)
        _PEAK_OPERANDS[key] = (a, b, torch.empty(size, size, device=device))
    a, b, c = _PEAK_OPERANDS[key]
    return Candidate(
        PEAK,
        "peak",
        lambda: torch.mm(a, b, out=c),
        check=False,
        flops=2.0 * size**3,
        note=f"{size}x{size} float32 torch.mm",
    )


def loop_candidate(w: Workload, models: list[nn.Module], x: Tensor) -> Candidate:
    """The Python loop over the standalone members: the reference and the baseline."""
    if w.per_member:
        return Candidate(LOOP, "baseline", lambda: torch.stack([m(xi) for m, xi in zip(models, x)]))
    return Candidate(LOOP, "baseline", lambda: torch.stack([m(x) for m in models]))


def build_candidates(
    w: Workload, models: list[nn.Module], x: Tensor, opts: Options
) -> list[Candidate]:
    """Every candidate for workload ``w``; the loop comes first.

    Args:
        w: the workload.
        models: its standalone members, already on ``opts.device``.
        x: the call's input, on ``opts.device`` (``(N, B, ...)`` when per member).
        opts: device, compile and peer settings.

    Returns:
        The loop, torch.func (and its ``torch.compile``), the hand-batched MLPs, every
        vensemble backend (and ``compile=True`` when it builds), then the peers.
    """
    from ._bench_peers import peer_candidates

    out = [loop_candidate(w, models, x)]
    out += _torch_func_candidates(w, models, x, opts)
    out += _hand_candidates(w, models, x)
    out += _vensemble_candidates(w, models, x, opts)
    if opts.peers:
        out += peer_candidates(w, models, x, opts.device)
    return out
