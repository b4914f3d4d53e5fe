"""Per-member losses: each member's own mean loss from stacked ``(N, B, ...)`` outputs.

Training N members as one minimises ``member_loss(...).sum()``: the *sum* over members of each
member's mean loss. Its gradient with respect to member ``i``'s parameters is exactly the
gradient of member ``i``'s own loss, as if it were trained alone. A mean over members would
scale every member's gradient by ``1/N`` (with SGD, an ``N`` times smaller learning rate; with
Adam, a changed ``eps`` balance), and a loss computed over the flattened ``(N * B, ...)`` batch
does the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import EnsembleError
from .backends import FallbackWarning

__all__ = ["member_loss"]

LossFn = Callable[..., Tensor]

# Losses whose mean reduction is the mean of their reduction="none" values (over the samples
# that count): for these, one call on the flattened (N * B, ...) batch gives every member's
# loss, without vmap. "class": outputs (B, C, ...) and class-index or probability targets;
# "elementwise": outputs and targets of the same shape.
_FAST_FUNCTIONS: dict[Callable[..., Tensor], str] = {
    F.cross_entropy: "class",
    F.nll_loss: "class",
    F.mse_loss: "elementwise",
    F.l1_loss: "elementwise",
    F.smooth_l1_loss: "elementwise",
    F.huber_loss: "elementwise",
    F.binary_cross_entropy_with_logits: "elementwise",
    F.binary_cross_entropy: "elementwise",
}

_warned: set[str] = set()


def _module_call(loss_fn: nn.Module) -> tuple[Callable[..., Tensor], str, str, int] | None:
    """For a stock torch loss module: (function with reduction="none", kind, reduction, ignore)."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum") or getattr(loss_fn, "weight", None) is not None:
        return None
    t = type(loss_fn)
    if t is nn.CrossEntropyLoss:
        m: Any = loss_fn

        def ce(o: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(
                o,
                y,
                ignore_index=m.ignore_index,
                reduction="none",
                label_smoothing=m.label_smoothing,
            )

        return ce, "class", reduction, m.ignore_index
    if t is nn.NLLLoss:
        ignore = int(loss_fn.ignore_index)  # type: ignore[arg-type]

        def nll(o: Tensor, y: Tensor) -> Tensor:
            return F.nll_loss(o, y, ignore_index=ignore, reduction="none")

        return nll, "class", reduction, ignore
    simple: dict[type, Callable[[Tensor, Tensor], Tensor]] = {
        nn.MSELoss: lambda o, y: F.mse_loss(o, y, reduction="none"),
        nn.L1Loss: lambda o, y: F.l1_loss(o, y, reduction="none"),
        nn.BCELoss: lambda o, y: F.binary_cross_entropy(o, y, reduction="none"),
        nn.SmoothL1Loss: lambda o, y: F.smooth_l1_loss(
            o,
            y,
            reduction="none",
            beta=loss_fn.beta,  # type: ignore[arg-type]
        ),
        nn.HuberLoss: lambda o, y: F.huber_loss(
            o,
            y,
            reduction="none",
            delta=loss_fn.delta,  # type: ignore[arg-type]
        ),
        nn.BCEWithLogitsLoss: lambda o, y: F.binary_cross_entropy_with_logits(
            o,
            y,
            reduction="none",
            pos_weight=loss_fn.pos_weight,  # type: ignore[arg-type]
        ),
    }
    if t in simple:
        return simple[t], "elementwise", reduction, -100
    return None


def _fast_plan(loss_fn: LossFn) -> tuple[Callable[..., Tensor], str, str, int] | None:
    if isinstance(loss_fn, nn.Module):
        return _module_call(loss_fn)
    try:
        return _FUNCTION_PLANS.get(loss_fn)
    except TypeError:  # an unhashable callable object
        return None


def _unreduced(fn: Callable[..., Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def call(o: Tensor, y: Tensor) -> Tensor:
        return fn(o, y, reduction="none")

    return call


# the plans of the plain loss functions above, built once at import: a loss runs every step
_FUNCTION_PLANS: dict[Any, tuple[Callable[..., Tensor], str, str, int]] = {
    fn: (_unreduced(fn), kind, "mean", -100) for fn, kind in _FAST_FUNCTIONS.items()
}


def _fast_member_loss(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, per_member: bool
) -> Tensor | None:
    """Every member's loss from one call on the flattened batch, or None when not applicable."""
    plan = _fast_plan(loss_fn)
    if plan is None:
        return None
    call, kind, reduction, ignore_index = plan
    n = outputs.shape[0]
    member_out = outputs.shape[1:]  # (B, ...)
    member_target = targets.shape[1:] if per_member else targets.shape
    if kind == "elementwise":
        if member_target != member_out:
            return None  # broadcasting targets: let the loss function itself decide
    else:
        class_target = member_out[:1] + member_out[2:]  # (B, *d): the class dim removed
        integer = not (targets.is_floating_point() or targets.is_complex())
        if len(member_out) < 2 or member_target != (class_target if integer else member_out):
            return None
    flat_out = outputs.flatten(0, 1)  # (N * B, ...)
    full = targets if per_member else targets.expand(n, *targets.shape)
    flat_target = full.flatten(0, 1)  # (N * B, ...)
    values = call(flat_out, flat_target).view(n, -1)  # (N, B * ...)
    total = values.sum(dim=1)  # (N,)
    if reduction == "sum":
        return total
    if kind == "class" and not (targets.is_floating_point() or targets.is_complex()):
        count = (full != ignore_index).view(n, -1).sum(dim=1)  # (N,): the samples that count
        return total / count  # (an integer count: true division gives total's dtype)
    return total / values.shape[1]


def _targets_layout(outputs: Tensor, targets: Tensor, per_member_targets: bool | None) -> bool:
    """Whether ``targets`` has one slice per member (True) or is shared (False)."""
    n, b = outputs.shape[:2]
    shared_ok = targets.ndim >= 1 and targets.shape[0] == b
    member_ok = targets.ndim >= 2 and targets.shape[:2] == (n, b)
    expected = (
        f"expected ({b}, ...) shared by all members or ({n}, {b}, ...) with one slice per member"
    )
    if per_member_targets is None:
        if shared_ok and member_ok:
            raise EnsembleError(
                f"targets of shape {tuple(targets.shape)} could be shared or per member for "
                f"outputs of shape {tuple(outputs.shape)} (members and batch are both {n}); "
                "pass per_member_targets=True or False"
            )
        if not (shared_ok or member_ok):
            raise EnsembleError(
                f"targets of shape {tuple(targets.shape)} do not match the outputs of shape "
                f"{tuple(outputs.shape)} (num_members, batch, ...): {expected}"
            )
        return member_ok
    ok = member_ok if per_member_targets else shared_ok
    if not ok:
        raise EnsembleError(
            f"targets of shape {tuple(targets.shape)} do not match the outputs of shape "
            f"{tuple(outputs.shape)} with per_member_targets={per_member_targets}: {expected}"
        )
    return per_member_targets


def _vmapped_member_loss(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, per_member: bool
) -> Tensor:
    in_dims = (0, 0 if per_member else None)
    try:
        return torch.vmap(loss_fn, in_dims=in_dims)(outputs, targets)
    except Exception as err:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
        losses = [
            loss_fn(outputs[i], targets[i] if per_member else targets)
            for i in range(outputs.shape[0])
        ]  # the loop raises the loss function's own error if it is a genuine mistake
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"vensemble: vmap cannot run the loss {name} ({type(err).__name__}); it runs "
                "once per member instead (same results, slower)",
                FallbackWarning,
                stacklevel=3,
            )
        if not all(isinstance(v, Tensor) and v.ndim == 0 for v in losses):
            shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in losses]
            raise EnsembleError(
                f"loss_fn must return one number per member; member 0 gave {shapes[0]}"
            ) from None
        return torch.stack(losses)


def member_loss(
    loss_fn: LossFn,
    outputs: Tensor,
    targets: Tensor,
    *,
    per_member_targets: bool | None = None,
) -> Tensor:
    """Each member's own loss, ``loss_fn(outputs[i], targets_i)``, for all members at once.

    Train on ``member_loss(...).sum()``, the sum over members of each member's mean loss: its
    gradient for member ``i`` is exactly member ``i``'s own gradient. A mean over members
    would silently scale every member's gradient by ``1/N``.

    Stock torch losses (``F.cross_entropy``, ``nn.MSELoss()``, ... with ``reduction="mean"`` or
    ``"sum"`` and no class ``weight``) run as one call on the flattened batch; any other loss
    runs under ``torch.vmap`` (or, where vmap cannot run it, once per member, with one
    :class:`~vensemble.FallbackWarning`).

    Args:
        loss_fn: ``loss_fn(member_outputs, member_targets) -> 0-dim tensor``, e.g.
            ``torch.nn.functional.cross_entropy`` or ``torch.nn.MSELoss()``.
        outputs: stacked outputs of shape ``(N, B, ...)``, e.g. ``ens(x)``.
        targets: ``(B, ...)`` shared by all members, or ``(N, B, ...)`` with member ``i``'s
            targets in ``targets[i]``.
        per_member_targets: whether ``targets`` has a leading member dim; ``None`` infers it
            from the shapes (and raises where both readings fit).

    Returns:
        The members' losses, shape ``(N,)``.

    Raises:
        EnsembleError: if the leading sizes of ``targets`` match neither layout (the message
            gives both shapes), or ``loss_fn`` does not return one number per member.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> outputs = torch.zeros(3, 4, 2)  # 3 members, 4 samples, 2 classes
        >>> member_loss(F.cross_entropy, outputs, torch.tensor([0, 1, 1, 0]))
        tensor([0.6931, 0.6931, 0.6931])
    """
    if not isinstance(outputs, Tensor) or outputs.ndim < 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise EnsembleError(f"outputs must be a tensor of shape (N, B, ...), got {shape}")
    if not isinstance(targets, Tensor):
        raise EnsembleError(f"targets must be a tensor, got {type(targets).__name__}")
    per_member = _targets_layout(outputs, targets, per_member_targets)
    losses = _fast_member_loss(loss_fn, outputs, targets, per_member)
    if losses is None:
        losses = _vmapped_member_loss(loss_fn, outputs, targets, per_member)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (outputs.shape[0],):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise EnsembleError(
            f"loss_fn must return one number per member (reduction='mean' or 'sum'); for "
            f"{outputs.shape[0]} members it gave shape {got}"
        )
    return losses
