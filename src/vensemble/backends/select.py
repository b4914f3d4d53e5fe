"""The ``auto`` backend: vmap where it runs, a per-member loop for the submodules where it cannot."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from .._errors import EnsembleError
from ._call import (
    Call,
    hold_attributes,
    put_back_attributes,
    rng_snapshot,
    stack_outputs,
    state_device,
    under,
)
from .loop import loop_forward
from .vmap import vmap_forward

__all__ = [
    "AutoPlan",
    "FallbackWarning",
    "auto_forward",
    "check_loop_runs",
    "raise_if_randomness_error",
    "snapshot_buffers",
    "strict_vmap_forward",
]


class FallbackWarning(UserWarning):
    """vmap cannot run part of a model; that part runs as a per-member loop instead."""


@dataclass
class AutoPlan:
    """What ``auto`` learned about a model: which submodules run as a per-member loop.

    Attributes:
        looped: module paths (``""`` is the whole model) that run one member at a time.
        reasons: for each looped path, the error vmap raised there.
    """

    looped: set[str] = field(default_factory=set)
    reasons: dict[str, str] = field(default_factory=dict)


class _LoopBridge(torch.autograd.Function):
    """Runs a submodule once per member from inside an outer ``vmap``.

    vmap hands the ``vmap`` staticmethod the unbatched tensors; it loops over members with
    ordinary differentiable ops, so autograd records them and gradients flow as usual.
    """

    @staticmethod
    def forward(module: nn.Module, names: list[str], spec: Any, *leaves: Any) -> Any:
        raise RuntimeError("vensemble: a looped submodule was called outside of vmap")

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any, in_dims: Any, module: nn.Module, names: list[str], spec: Any, *leaves: Any
    ) -> Any:
        dims = in_dims[3:]
        k, n = len(names), info.batch_size
        renormed = _renormed_weights(module)
        # every member's view of a tensor from one unbind, as the loop backend takes them (its
        # backward also takes sparse gradients, which select's does not), except for tables
        # renormalised in place: autograd forbids modifying one op's several outputs in place
        per_member = [
            [t] * n
            if d is None or not isinstance(t, Tensor)
            else [t.select(d, i) for i in range(n)]
            if j < k and names[j] in renormed
            else t.unbind(d)
            for j, (t, d) in enumerate(zip(leaves, dims))
        ]
        outputs = []
        for i in range(n):
            sliced = [views[i] for views in per_member]
            state = dict(zip(names, sliced[:k]))
            args, kwargs = pytree.tree_unflatten(sliced[k:], spec)
            with _unpatched(module):
                outputs.append(functional_call(module, state, tuple(args), kwargs))
        out = stack_outputs(outputs)
        return out, pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, out)


def _renormed_weights(module: nn.Module) -> set[str]:
    """The names (relative to ``module``) of the embedding tables its forward renormalises
    in place (``max_norm``)."""
    return {
        f"{path}.weight" if path else "weight"
        for path, m in module.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    }


@contextlib.contextmanager
def _unpatched(module: nn.Module) -> Iterator[None]:
    patch = module.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if patch is not None:
            module.__dict__["forward"] = patch


def _looped_forward(module: nn.Module) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        leaves, spec = pytree.tree_flatten((list(args), kwargs))
        return _LoopBridge.apply(module, list(state), spec, *state.values(), *leaves)

    return forward


@contextlib.contextmanager
def _looping(template: nn.Module, paths: set[str]) -> Iterator[None]:
    """Make the submodules at ``paths`` run member by member while vmap runs the rest."""
    modules = [template.get_submodule(p) for p in sorted(paths) if p]
    for m in modules:
        m.__dict__["forward"] = _looped_forward(m)
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def _tracking(template: nn.Module, stack: list[str]) -> Iterator[None]:
    """Keep ``stack`` equal to the paths of the modules whose forward is running."""
    handles = []
    for path, m in template.named_modules():

        def push(_m: nn.Module, _args: Any, path: str = path) -> None:
            stack.append(path)

        def pop(_m: nn.Module, _args: Any, _out: Any) -> None:
            stack.pop()

        handles.append(m.register_forward_pre_hook(push))
        handles.append(m.register_forward_hook(pop))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def raise_if_randomness_error(call: Call, err: BaseException) -> None:
    """With ``randomness="error"`` a random op must raise, not fall back to a loop."""
    if call.randomness == "error" and isinstance(err, RuntimeError) and "randomness" in str(err):
        raise err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _attempt(
    call: Call, looped: set[str], snapshot: dict[str, Tensor] | None
) -> tuple[Any, str | None, BaseException | None]:
    """Run vmap with ``looped`` submodules; on failure undo buffer updates, locate the culprit."""
    if "" in looped:
        return loop_forward(call), None, None
    sparse = _sparse_grad_module(call, looped)
    if sparse is not None:  # vmap would run, and its backward fail far from here
        chunked = call.chunk_size is not None and call.chunk_size < call.n
        why = _SPARSE_GRAD + (
            "; chunk_size splits the tables, which has none either" if chunked else ""
        )
        return None, "" if chunked else sparse, RuntimeError(why)
    try:
        with _looping(call.template, looped):
            # (a looped submodule may store on itself: it runs one member at a time, as alone)
            held = hold_attributes(call.template, skip=looped)
            out = vmap_forward(call)
            # a tensor a forward stored on its module would be a batched one escaping vmap;
            # other values (a call counter) are kept, as vmap kept them before
            stored = put_back_attributes(held, tensors_only=True)
            if not stored:
                return out, None, None
            path, name, _ = stored[0]
            if snapshot is not None:
                call.restore_buffers(snapshot)
            return (
                None,
                path,
                RuntimeError(
                    f"the forward stores '{name}' on the module: under vmap a batched tensor "
                    "would escape into it"
                ),
            )
    except Exception as err:
        if snapshot is not None:
            call.restore_buffers(snapshot)
        stack: list[str] = []
        try:
            with _looping(call.template, looped), _tracking(call.template, stack):
                vmap_forward(call)
        except Exception:
            pass
        if snapshot is not None:
            call.restore_buffers(snapshot)
        return None, (stack[-1] if stack else ""), err


_SPARSE_GRAD = (
    "Embedding(sparse=True) under autograd: torch.vmap has no backward for sparse gradients "
    "(reshape is not implemented for sparse tensors)"
)


def _sparse_grad_module(call: Call, looped: set[str]) -> str | None:
    """The path of an ``Embedding(sparse=True)`` that would get a gradient under vmap (and
    not one inside a looped submodule), else ``None``."""
    if not torch.is_grad_enabled():
        return None
    if call.chunk_size is not None and call.chunk_size < call.n:
        looped = set()  # the chunks split every table, the looped ones' too
    for path, m in call.template.named_modules():
        if (
            isinstance(m, nn.Embedding)
            and m.sparse
            and m.weight.requires_grad
            and not under(path, looped)
        ):
            return path
    return None


def check_loop_runs(
    call: Call, snapshot: dict[str, Tensor] | None, err: BaseException | None = None
) -> None:
    """Raise the model's own error when the reference loop fails too (a genuine mistake);
    refuse to go on when the failed attempt modified an input in place (every later attempt,
    this check's loop included, would see other values than the members would)."""
    k = call.modified_input()
    if k is not None:
        raise EnsembleError(
            f"the forward modified input tensor {k} in place, and then a vectorized attempt "
            "failed: a fallback would run on the modified values. Pass a copy of the input, "
            "or use backend='loop' (or 'vmap', where it runs)"
            + ("" if err is None else f" (the attempt's error: {_first_line(err)})")
        ) from err
    try:
        with torch.no_grad():
            loop_forward(call)
    finally:
        if snapshot is not None:
            call.restore_buffers(snapshot)


def snapshot_buffers(call: Call) -> dict[str, Tensor] | None:
    if not call.template.training or next(call.template.buffers(), None) is None:
        return None
    return call.snapshot_buffers()


def strict_vmap_forward(call: Call) -> Any:
    """The ``vmap`` backend: all of the model under vmap, or an ``EnsembleError`` saying why not."""
    snapshot = snapshot_buffers(call)
    call.remember_input_versions()
    out, culprit, err = _attempt(call, set(), snapshot)
    if err is None:
        return out
    raise_if_randomness_error(call, err)
    check_loop_runs(call, snapshot, err)
    where = f"submodule '{culprit}' ({type(call.template.get_submodule(culprit or '')).__name__})"
    where = where if culprit else f"the model's own forward ({type(call.template).__name__})"
    raise EnsembleError(
        f"backend='vmap' cannot run {where}: {_first_line(err)}. Use backend='auto' to run that "
        "part as a per-member loop (same results) and everything else with vmap."
    ) from None


def auto_forward(call: Call, plan: AutoPlan) -> Any:
    """vmap over the members, with the submodules in ``plan.looped`` run as a loop.

    On a new vmap failure the culprit submodule (the innermost module running when vmap
    raised) joins the looped set and the call is retried; buffers updated in place by a
    failed attempt are restored first. A :class:`FallbackWarning` names each new culprit once.
    A failure the reference loop shares is the model's own error and is raised unchanged.
    """
    snapshot = snapshot_buffers(call)
    restore_rng = rng_snapshot(state_device(call.state))
    call.remember_input_versions()
    looped = set(plan.looped)
    new: dict[str, str] = {}
    checked = False
    while True:
        out, culprit, err = _attempt(call, looped, snapshot)
        if err is None:
            break
        raise_if_randomness_error(call, err)
        if not checked:
            check_loop_runs(call, snapshot, err)
            checked = True
        if culprit is None or culprit in looped:
            culprit = ""  # looping the submodule was not enough: loop the whole model
        restore_rng()  # the retry draws what the call started with (the attempt, its
        # diagnosis and check_loop_runs drew random numbers)
        looped.add(culprit)
        new[culprit] = _first_line(err)
    for path, reason in new.items():
        plan.looped.add(path)
        plan.reasons[path] = reason
        full = ".".join(p for p in (call.name, path) if p)
        kind = type(call.template.get_submodule(path)).__name__
        what = f"submodule '{full}' ({kind})" if full else "the model's forward"
        warnings.warn(
            f"vensemble: vmap cannot run {what} ({reason}); it now runs as a per-member loop "
            "(same results, slower). Everything else still runs under vmap.",
            FallbackWarning,
            stacklevel=4,
        )
    return out
