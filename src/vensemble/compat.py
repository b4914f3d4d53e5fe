"""The tutorial's functorch API, ``combine_state_for_ensemble`` and ``vmap``, done safely."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ._state import meta_skeleton, validate_members
from .backends._call import vmap_friendly_kernels

__all__ = ["FunctionalModuleWithBuffers", "combine_state_for_ensemble", "vmap"]


class FunctionalModuleWithBuffers:
    """A stateless model: ``fmodel(params, buffers, *args, **kwargs)`` runs one member.

    It keeps a weightless (meta-device) copy of the member with its weight tying intact, so a
    tied output layer computes with the given weights rather than with uninitialised memory.
    """

    def __init__(
        self, skeleton: nn.Module, param_names: Sequence[str], buffer_names: Sequence[str]
    ):
        self.stateless_model = skeleton
        self.param_names = tuple(param_names)
        self.buffer_names = tuple(buffer_names)

    def __call__(
        self, params: Sequence[Tensor], buffers: Sequence[Tensor], *args: Any, **kwargs: Any
    ) -> Any:
        state = {**dict(zip(self.param_names, params)), **dict(zip(self.buffer_names, buffers))}
        with vmap_friendly_kernels(params[0].device if params else None):
            return functional_call(self.stateless_model, state, args, kwargs)


def combine_state_for_ensemble(
    models: Sequence[nn.Module],
) -> tuple[FunctionalModuleWithBuffers, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Stack the members' state for ``vmap``, as functorch's function of the same name did.

    Checks that the members are one architecture (same classes, shapes, configuration and
    Python attributes) before stacking; weight tying inside a member is kept.

    Args:
        models: N modules of one architecture, all in train or all in eval mode.

    Returns:
        ``(fmodel, params, buffers)``: ``params`` and ``buffers`` are tuples of tensors with a
        leading dim of N (detached: call ``requires_grad_()`` to train them), and
        ``fmodel(params, buffers, x)`` runs one member, to be wrapped in ``vmap``.

    Example:
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> fmodel, params, buffers = combine_state_for_ensemble(models)
        >>> vmap(fmodel, in_dims=(0, 0, None))(params, buffers, torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
    """
    models = list(models)
    validate_members(models)
    first = models[0]
    param_names = [name for name, _ in first.named_parameters()]
    buffer_names = [name for name, _ in first.named_buffers()]
    with torch.no_grad():
        params = tuple(
            torch.stack([m.get_parameter(n).detach() for m in models]) for n in param_names
        )
        buffers = tuple(
            torch.stack([m.get_buffer(n).detach() for m in models]) for n in buffer_names
        )
    fmodel = FunctionalModuleWithBuffers(meta_skeleton(first), param_names, buffer_names)
    return fmodel, params, buffers
