"""The reference backend: run the members one after another and stack their outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call

from ._call import Call, stack_outputs

__all__ = ["loop_forward"]


def loop_forward(call: Call) -> Any:
    """Run each member on its inputs in turn; outputs stacked along a new dim 0.

    Member ``i`` computes with views ``t[i]`` of the stacked tensors, so gradients reach the
    stacked parameters and in-place buffer updates (BatchNorm running stats) land in member
    ``i``'s slice. With ``randomness="same"`` every member starts from the same RNG state.
    """
    same = call.randomness == "same"
    start = torch.get_rng_state() if same else None
    outputs = []
    for i in range(call.n):
        if start is not None:
            torch.set_rng_state(start)
        state = {k: t[i] for k, t in call.state.items()}
        outputs.append(functional_call(call.template, state, call.member_args(i), call.kwargs))
    return stack_outputs(outputs)
