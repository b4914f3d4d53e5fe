"""The torch.func backend: one ``vmap`` over the members of ``functional_call``."""

from __future__ import annotations

from typing import Any

from torch.func import functional_call, vmap

from ._call import Call, state_device, vmap_friendly_kernels

__all__ = ["vmap_forward"]


def vmap_forward(call: Call) -> Any:
    """Run all members at once with ``torch.func.vmap`` over the stacked state.

    Raises whatever vmap raises for an op it cannot batch; ``auto`` handles those.
    """

    def one_member(state: dict[str, Any], *args: Any) -> Any:
        return functional_call(call.template, state, args, call.kwargs)

    batched = vmap(
        one_member,
        in_dims=(0, *call.in_dims),
        randomness=call.randomness,
        chunk_size=call.chunk_size,
    )
    with vmap_friendly_kernels(state_device(call.state)):
        return batched(call.state, *call.args)
