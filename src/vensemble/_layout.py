"""Memory layout of stacked tensors: how the batched kernels want them, shapes unchanged.

A stacked ``nn.Linear`` weight has the logical shape ``(N, out, in)``, the member's own
``(out, in)`` with the member dim in front. The batched forward computes ``x @ W^T`` for all
members with one ``bmm`` over ``(N, B, in) @ (N, in, out)``; that kernel runs fastest when the
right operand is contiguous, as in hand-batched code that keeps pre-transposed weights. So the
ensemble stores each such weight *in-major*: the memory holds ``(N, in, out)`` and the
parameter is its transposed view (strides ``(in * out, 1, out)``). Shapes, names, values,
``state_dict`` keys and every result are the member's; only ``weight.is_contiguous()`` is
``False``. Gradients and optimizer state follow the parameter's layout (autograd and
``torch.optim`` preserve strides), files are written contiguous, and members taken out with
``Ensemble.member`` are ordinary contiguous modules.

Stacked ``nn.Conv2d`` weights keep the members' own memory format: each member's slice is
channels-last when the members' weights are (``model.to(memory_format=torch.channels_last)``
before stacking), contiguous otherwise. The format decides the format of the convolution's
output inside the forward, and with it whether a ``view`` of that output works (the classic
``x.view(x.size(0), -1)`` raises on a channels-last result): the ensemble must run every
member as the member runs alone. (Storing float32 CPU weights channels-last regardless made
the benchmark CNN 5-10% faster and broke that idiom in the loop and vmap backends.)

Weights tied to another module (an embedding shared with an output layer, say), parametrized
weights and large weights keep the ordinary layout; the batched ``Linear`` handles both. Large:
above ``IN_MAJOR_MAX_ELEMENTS`` per member. Measured on a 2-core Xeon (fused forward of 3 square
layers, batch 64, 2 threads): in-major was 20-35% faster at 256x256, 512x512 and 724x724, and
20-25% slower at 1024x1024, where the GEMM dominates and BLAS reads a transposed operand at full
speed; a large layer also pays for the transposing copy whenever it is saved or loaded.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "IN_MAJOR_MAX_ELEMENTS",
    "channels_last_members",
    "contiguous_order",
    "in_major",
    "in_member_format",
    "member_copy",
    "member_rows",
    "member_strides",
    "restacked_like",
    "stacked_like",
    "use_kernel_layout",
]

IN_MAJOR_MAX_ELEMENTS = 2**19  # per member, in * out: 724 x 724 still gains, 1024 x 1024 loses


def in_major(w: Tensor) -> bool:
    """Whether a stacked ``(N, out, in)`` weight is stored as ``(N, in, out)`` in memory.

    (With ``out == 1`` or ``in == 1`` both layouts are the same memory: then it is ``True``.)

    Example:
        >>> w = torch.zeros(3, 4, 2)
        >>> in_major(w), in_major(w.transpose(1, 2).contiguous().transpose(1, 2))
        (False, True)
    """
    if w.ndim != 3:
        return False
    n, out_f, in_f = w.shape  # strides compared directly: this runs on every batched call
    s0, s1, s2 = w.stride()
    return (s1 == 1 or out_f == 1) and (s2 == out_f or in_f == 1) and (s0 == out_f * in_f or n == 1)


def _in_major_copy(w: Tensor) -> Tensor:
    n, out_f, in_f = w.shape
    new = torch.empty_strided(
        (n, out_f, in_f), (in_f * out_f, 1, out_f), dtype=w.dtype, device=w.device
    )
    return new.copy_(w) if w.device.type != "meta" else new


def _format_strides(shape: tuple[int, ...], fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides a tensor of ``shape`` gets in memory format ``fmt`` (exactly: size-1 dims
    included), as ``torch.empty(..., memory_format=fmt)`` lays it out."""
    return tuple(torch.empty(shape, device="meta", memory_format=fmt).stride())


def _with_member_strides(t: Tensor, strides: tuple[int, ...]) -> Tensor:
    """Stacked ``t`` copied so that each member's slice has exactly ``strides`` (members one
    after another in memory); ``t`` itself when it is so already."""
    numel = math.prod(t.shape[1:])
    want = (numel, *strides)
    if tuple(t.stride()) == want or (t.shape[0] == 1 and tuple(t.stride()[1:]) == strides):
        return t
    new = torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device)
    return new.copy_(t) if t.device.type != "meta" else new


def _own_strides(t: Tensor) -> tuple[int, ...] | None:
    """A member's tensor's strides where they are to be kept: a 4-d or 5-d tensor (a conv
    weight) densely laid out in another order than the default one (channels-last). Exact
    strides, size-1 dims included: torch's conv picks its result's layout from them."""
    if t.ndim not in (4, 5) or t.layout != torch.strided:
        return None
    strides = tuple(t.stride())
    if strides == _format_strides(tuple(t.shape), torch.contiguous_format):
        return None
    return strides if _dense_order(t) is not None else None


def member_strides(t: Tensor) -> tuple[int, ...] | None:
    """The strides stacked ``t``'s member slices keep (see ``stacked_like``); ``None`` where
    they are the default contiguous ones.

    Example:
        >>> w = torch.zeros(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
        >>> member_strides(stacked_like([w, w])), member_strides(torch.zeros(2, 4, 3, 3, 3))
        ((27, 1, 9, 3), None)
    """
    if t.ndim not in (5, 6) or t.layout != torch.strided:
        return None
    numel = math.prod(t.shape[1:])
    if t.shape[0] > 1 and t.stride(0) != numel:
        return None
    return _own_strides(t[0])


def stacked_like(members: list[Tensor]) -> Tensor:
    """The members' tensors stacked along a new leading dim, each slice with the members' own
    strides where all of them share a non-default dense layout (channels-last conv weights,
    exactly as the members hold them); contiguous otherwise."""
    stacked = torch.stack(members)
    strides = _own_strides(members[0])
    if strides is not None and all(tuple(t.stride()) == strides for t in members):
        return _with_member_strides(stacked, strides)
    return stacked


def restacked_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (stacked members, e.g. some of ``like``'s) with ``like``'s member strides."""
    strides = member_strides(like)
    return t if strides is None else _with_member_strides(t, strides)


def member_copy(t: Tensor, i: int) -> Tensor:
    """A copy of member ``i``'s slice of stacked ``t`` as the member holds it: with the strides
    the members' conv weights were stacked with (see ``stacked_like``), contiguous for
    everything else (in-major ``Linear`` weights included: members taken out are ordinary
    modules)."""
    strides = member_strides(t)
    if strides is None:
        return t[i].clone(memory_format=torch.contiguous_format)
    new = torch.empty_strided(t.shape[1:], strides, dtype=t.dtype, device=t.device)
    return new.copy_(t[i])


def in_member_format(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """Stacked ``t`` with each member's slice in memory format ``fmt`` (``t`` itself when it is
    so already), as ``nn.Module.to(memory_format=fmt)`` lays out one model's tensors: only
    members' 4-d and 5-d tensors are converted; ``channels_last`` wants 4-d, ``channels_last_3d``
    5-d. The slices get the exact strides ``torch.empty(..., memory_format=fmt)`` gives.

    Example:
        >>> w = in_member_format(torch.zeros(2, 4, 3, 5, 5), torch.channels_last)
        >>> w.shape, w[1].is_contiguous(memory_format=torch.channels_last)
        (torch.Size([2, 4, 3, 5, 5]), True)
    """
    rank = t.ndim - 1
    if rank not in (4, 5) or fmt == torch.preserve_format:
        return t
    if fmt != torch.contiguous_format:
        want = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt)
        if want != rank:
            raise ValueError(
                f"memory_format={fmt} wants members' tensors of rank {want}, got one of shape "
                f"{tuple(t.shape[1:])}"
            )
    return _with_member_strides(t, _format_strides(tuple(t.shape[1:]), fmt))


def channels_last_members(w: Tensor) -> bool:
    """Whether a stacked ``(N, O, C, kh, kw)`` conv weight has channels-last member slices.

    Example:
        >>> w = torch.zeros(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
        >>> channels_last_members(stacked_like([w, w]))
        True
    """
    return w.ndim == 5 and w[0].is_contiguous(memory_format=torch.channels_last)


def use_kernel_layout(template: nn.Module) -> None:
    """Store the stacked template's ``nn.Linear`` weights in-major, in place (up to
    ``IN_MAJOR_MAX_ELEMENTS`` per member). ``nn.Conv2d`` weights keep the layout they were
    stacked in (see ``stacked_like``).

    The parameters stay the same objects (their ``.data`` is replaced), so nothing that holds
    them is left pointing at stale tensors. Weights that are tied to another module, are
    parametrized, or are not a plain ``(N, out, in)`` tensor are left as they are.

    Example:
        >>> template = torch.nn.Linear(2, 4)
        >>> template.weight = torch.nn.Parameter(torch.randn(3, 4, 2))  # 3 members, stacked
        >>> before = template.weight.detach().clone()
        >>> use_kernel_layout(template)
        >>> in_major(template.weight), torch.equal(template.weight, before)
        (True, True)
    """
    uses = Counter(id(p) for _, p in template.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for m in template.modules():
            if type(m) is not nn.Linear or parametrize.is_parametrized(m):
                continue
            w = _own_weight(m, uses)
            if w is None or w.ndim != 3 or w.shape[1] * w.shape[2] > IN_MAJOR_MAX_ELEMENTS:
                continue
            if not in_major(w):
                w.data = _in_major_copy(w)


def _own_weight(m: nn.Module, uses: Counter[int]) -> nn.Parameter | None:
    """``m.weight`` when it is a plain strided parameter that no other module shares."""
    w = m._parameters.get("weight")
    if w is None or uses[id(w)] != 1 or type(w) is not nn.Parameter:
        return None
    return w if w.layout == torch.strided else None


def contiguous_order(t: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dims, member dim first, under which it is contiguous.

    ``None`` when ``t`` is contiguous already or no such permutation exists (an element
    update does not care how elements are arranged, so optimizers see in-major weights through
    this permutation and run their fused kernels without copies).

    Example:
        >>> contiguous_order(torch.zeros(2, 3, 4).transpose(1, 2))
        (0, 2, 1)
    """
    if t.is_contiguous():
        return None
    order = _dense_order(t)
    return order if order is not None and order[0] == 0 else None


def _dense_order(t: Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dims, largest stride first, under which it is contiguous:
    ``None`` where its elements leave gaps or overlap in memory."""
    order = tuple(sorted(range(t.ndim), key=lambda d: -t.stride()[d]))
    return order if t.permute(order).is_contiguous() else None


def member_rows(t: Tensor) -> Tensor:
    """``t`` as ``(N, numel / N)``: member ``i``'s elements in row ``i``, without a copy when
    ``t`` is dense under some order of its dims (the row's element order is then the memory
    order). Row ``i`` holds the same values in the same order whatever ``N`` is, so a
    reduction over rows gives each member the same result in an ensemble of any size.

    Example:
        >>> member_rows(torch.arange(6.0).view(2, 3, 1).transpose(1, 2)).shape
        torch.Size([2, 3])
    """
    order = contiguous_order(t)
    return (t if order is None else t.permute(order)).reshape(t.shape[0], -1)
