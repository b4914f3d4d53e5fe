"""The torch.func backend: one ``vmap`` over the members of ``functional_call``."""

from __future__ import annotations

from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import functional_call, vmap

from ._call import Call, state_device, vmap_friendly_kernels

__all__ = ["vmap_forward"]

_TENSOR = object()  # where a tensor goes back into the output


def vmap_forward(call: Call) -> Any:
    """Run all members at once with ``torch.func.vmap`` over the stacked state.

    Raises whatever vmap raises for an op it cannot batch; ``auto`` handles those.
    """

    # vmap returns tensors only: other leaves of the output (MultiheadAttention's None
    # weights with need_weights=False) are kept aside, the same for every member
    structure: list[Any] = []

    def one_member(state: dict[str, Any], *args: Any) -> Any:
        out = functional_call(call.template, state, args, call.kwargs)
        leaves, spec = pytree.tree_flatten(out)
        if all(isinstance(x, Tensor) for x in leaves):
            return out
        structure[:] = [spec, [_TENSOR if isinstance(x, Tensor) else x for x in leaves]]
        return [x for x in leaves if isinstance(x, Tensor)]

    batched = vmap(
        one_member,
        in_dims=(0, *call.in_dims),
        randomness=call.randomness,
        chunk_size=call.chunk_size,
    )
    with vmap_friendly_kernels(state_device(call.state)):
        out = batched(call.state, *call.args)
    if not structure:
        return out
    spec, others = structure
    tensors = iter(out)
    return pytree.tree_unflatten([next(tensors) if x is _TENSOR else x for x in others], spec)
