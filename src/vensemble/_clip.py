"""Per-member gradient clipping: each member's gradients clipped by that member's own norm."""

from __future__ import annotations

import torch
from torch import Tensor

from ._errors import EnsembleError
from ._layout import member_rows
from .ensemble import Ensemble

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(
    ens: Ensemble,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Clip every member's gradients by that member's own total norm, in place.

    Equals ``torch.nn.utils.clip_grad_norm_(member_i.parameters(), max_norm, norm_type)`` on
    each member alone: member ``i``'s norm is taken over all of its gradients, and its
    gradients are scaled by ``min(1, max_norm / (norm_i + 1e-6))``. One global norm over the
    stacked gradients would couple the members (one member's large gradient would shrink
    everyone's step). Parameters without a gradient are skipped.

    Args:
        ens: the ensemble whose stacked gradients ``p.grad`` (shape ``(N, ...)``) to clip.
        max_norm: the largest norm each member's gradients may have.
        norm_type: the p of the p-norm (``float("inf")`` for the largest absolute value).
        error_if_nonfinite: raise if a member's norm is NaN or infinite.
        foreach: accepted for drop-in use with torch's signature; the norms are computed
            over the stacked gradients (one kernel per parameter for all members) either way.

    Returns:
        Each member's total gradient norm before clipping, shape ``(N,)``.

    Raises:
        EnsembleError: with ``error_if_nonfinite``, naming the members whose norm is not
            finite; or if ``max_norm`` is negative.

    Example:
        >>> import torch, vensemble as ve
        >>> ens = ve.Ensemble.from_factory(lambda: torch.nn.Linear(2, 1, bias=False), 2)
        >>> ens.weight.grad = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])  # norms 5 and 0.5
        >>> clip_grad_norm_(ens, max_norm=1.0)
        tensor([5.0000, 0.5000])
        >>> ens.weight.grad.norm(dim=(1, 2))
        tensor([1.0000, 0.5000])
    """
    if not isinstance(ens, Ensemble):
        raise EnsembleError(f"ens must be a vensemble.Ensemble, got {type(ens).__name__}")
    max_norm = float(max_norm)
    if max_norm < 0:
        raise EnsembleError(f"max_norm must be non-negative, got {max_norm}")
    norm_type = float(norm_type)
    n = len(ens)
    grads = [p.grad for p in ens.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(n)
    per_tensor = torch.stack(  # rows: no copy of in-major gradients, the same sum for any N
        [torch.linalg.vector_norm(member_rows(g), norm_type, dim=1) for g in grads], dim=1
    )  # (N, P): each member's norm of each gradient tensor, one row per member
    # over each member's row: a reduction over dim 0 of a (P, N) table would add in an order
    # that depends on N, and a member's norm must not depend on the ensemble's size
    total = torch.linalg.vector_norm(per_tensor, norm_type, dim=1)  # (N,)
    if error_if_nonfinite:
        bad = torch.nonzero(~torch.isfinite(total)).flatten().tolist()
        if bad:
            raise EnsembleError(
                f"the total norm of order {norm_type} of the gradients of member(s) {bad} is "
                f"non-finite ({[float(total[i]) for i in bad]}), so they cannot be clipped; "
                "pass error_if_nonfinite=False to clip anyway"
            )
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # (N,)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(n, *([1] * (g.ndim - 1))))
    return total
