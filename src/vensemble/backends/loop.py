"""The reference backend: run the members one after another and stack their outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._call import Call, stack_outputs

__all__ = ["loop_forward"]


def _slots(template: nn.Module) -> tuple[list[tuple[dict[str, Any], str, Tensor]], set[int]]:
    """Every ``(module._parameters or module._buffers, name, stacked tensor)`` of the template,
    and the ids of the weights their module rewrites in place in forward (an embedding's
    ``max_norm``)."""
    slots = []
    renormed = set()
    for m in template.modules():
        for d in (m._parameters, m._buffers):
            slots += [(d, k, t) for k, t in d.items() if t is not None]
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            renormed.add(id(m.weight))
    return slots, renormed


def loop_forward(call: Call, forward: Callable[..., Any] | None = None) -> Any:
    """Run each member on its inputs in turn; outputs stacked along a new dim 0.

    Member ``i`` computes with views ``t[i]`` of the stacked tensors, put in the template's
    parameter and buffer slots for its call (as ``torch.func.functional_call`` does, without
    its per-call bookkeeping) and put back afterwards, so gradients reach the stacked
    parameters and in-place buffer updates (BatchNorm running stats) land in member ``i``'s
    slice; tensors tied inside the member stay tied (one view each). With
    ``randomness="same"`` every member starts from the same RNG state.

    ``forward``: what runs each member in place of the template (a rewritten forward that
    reads the same slots, e.g. ``folded.FoldedProgram.module``).
    """
    same = call.randomness == "same"
    start = torch.get_rng_state() if same else None
    slots, renormed = _slots(call.template)
    # every member's view of each stacked tensor in one call (a tensor tied in two slots is
    # split once): cheaper than a select per member and tensor, and its backward stacks the
    # members' gradients once instead of adding N zero-padded ones
    unique = {id(t): t for _, _, t in slots}
    # (an embedding that renormalises its table in place gets one select per member: unbind's
    # views are one op's outputs, which autograd forbids modifying in place)
    views = {
        key: [t.select(0, i) for i in range(call.n)] if key in renormed else t.unbind(0)
        for key, t in unique.items()
    }
    plan = [(d, k, views[id(t)]) for d, k, t in slots]
    run = call.template if forward is None else forward
    outputs = []
    try:
        for i in range(call.n):
            if start is not None:
                torch.set_rng_state(start)
            for d, k, member_views in plan:
                d[k] = member_views[i]
            outputs.append(run(*call.member_args(i), **call.kwargs))
    finally:
        for d, k, t in slots:
            d[k] = t
    return stack_outputs(outputs)
