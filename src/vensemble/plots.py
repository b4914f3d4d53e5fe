"""Diagnostic plots of ensemble predictions: reliability, disagreement, uncertainty vs error.

Each function returns a :class:`matplotlib.figure.Figure` built without pyplot, so it works with
no display (save it with ``fig.savefig(path)``). matplotlib is optional: install it with
``pip install 'vensemble[plot]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._errors import EnsembleError
from .metrics import auroc, calibration_bins, disagreement, expected_calibration_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["disagreement_histogram", "reliability_diagram", "uncertainty_vs_error"]


def _new_figure(figsize: tuple[float, float] = (4.5, 4.0)) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "vensemble's plots need matplotlib; install it with pip install 'vensemble[plot]'"
        ) from None
    return Figure(figsize=figsize, layout="constrained")


def reliability_diagram(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Figure:
    """Accuracy against confidence in equal-width bins, with the diagonal of perfect calibration.

    One bar per bin (height 0 for empty bins), as in
    :func:`vensemble.metrics.calibration_bins`; the title gives the ECE.

    Args:
        probs: Probabilities of shape ``(batch, classes)``, e.g. ``metrics.mean_probs(logits)``.
        targets: Class indices of shape ``(batch,)``.
        n_bins: Number of equal-width confidence bins.

    Returns:
        A figure with one axes holding ``n_bins`` bars.

    Raises:
        EnsembleError: If the inputs are invalid (see :func:`vensemble.metrics.accuracy`).
        ImportError: If matplotlib is not installed.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> fig = reliability_diagram(probs, torch.tensor([0, 1, 1]), n_bins=5)
        >>> len(fig.axes[0].patches)
        5
    """
    _, accuracy, _ = calibration_bins(probs, targets, n_bins)
    ece = float(expected_calibration_error(probs, targets, n_bins))
    fig = _new_figure()
    ax = fig.add_subplot()
    edges = torch.linspace(0, 1, n_bins + 1)
    ax.bar(
        edges[:-1].tolist(),
        accuracy.detach().cpu().tolist(),
        width=1 / n_bins,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"Reliability (ECE = {ece:.3f})")
    ax.legend(loc="upper left")
    return fig


def disagreement_histogram(logits: Tensor) -> Figure:
    """How many samples have each level of member disagreement.

    With ``N`` members, :func:`vensemble.metrics.disagreement` takes the values ``k / N``;
    the histogram has one bar for each ``k = 0..N``.

    Args:
        logits: Member logits of shape ``(num_members, batch, classes)``, all finite.

    Returns:
        A figure with one axes holding ``num_members + 1`` bars.

    Raises:
        EnsembleError: If ``logits`` is invalid (see :func:`vensemble.metrics.mean_probs`).
        ImportError: If matplotlib is not installed.

    Example:
        >>> fig = disagreement_histogram(torch.randn(4, 10, 3))
        >>> len(fig.axes[0].patches)
        5
    """
    share = disagreement(logits)  # (B,), multiples of 1/N
    n = logits.shape[0]
    counts = torch.bincount((share * n).round().long().cpu(), minlength=n + 1)  # (N + 1,)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.bar([k / n for k in range(n + 1)], counts.tolist(), width=0.8 / n, edgecolor="black")
    ax.set(xlabel="share of members disagreeing with the ensemble", ylabel="samples")
    ax.set_title(f"Member disagreement ({n} members)")
    return fig


def uncertainty_vs_error(uncertainty: Tensor, is_error: Tensor, n_bins: int = 10) -> Figure:
    """Error rate in equal-mass bins of uncertainty: a useful uncertainty rises left to right.

    Samples are sorted by uncertainty and split into ``n_bins`` groups of near-equal size; one
    point per non-empty group shows its mean uncertainty and error rate. The title gives the
    AUROC of the uncertainty for detecting errors when both outcomes occur.

    Args:
        uncertainty: Per-sample uncertainty ``(batch,)``, e.g. ``metrics.predictive_entropy``.
        is_error: Whether each prediction was wrong ``(batch,)``, bool or 0/1.
        n_bins: Number of equal-mass bins.

    Returns:
        A figure with one axes holding one line of ``min(n_bins, batch)`` points.

    Raises:
        EnsembleError: If the shapes differ or are empty, or the values are invalid.
        ImportError: If matplotlib is not installed.

    Example:
        >>> u = torch.tensor([0.1, 0.2, 0.3, 0.9])
        >>> fig = uncertainty_vs_error(u, torch.tensor([0, 0, 1, 1]), n_bins=2)
        >>> fig.axes[0].lines[0].get_ydata().tolist()
        [0.0, 1.0]
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise EnsembleError(f"n_bins must be a positive int, got {n_bins!r}")
    for name, x in (("uncertainty", uncertainty), ("is_error", is_error)):
        if not isinstance(x, Tensor) or x.ndim != 1 or x.shape[0] == 0:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise EnsembleError(f"{name} must be a non-empty tensor (batch,), got {shape}")
    if uncertainty.shape != is_error.shape:
        raise EnsembleError(
            f"uncertainty and is_error must have the same shape: uncertainty "
            f"{tuple(uncertainty.shape)}, is_error {tuple(is_error.shape)}"
        )
    if not bool(((is_error == 0) | (is_error == 1)).all()):
        raise EnsembleError("is_error must be bool or 0/1")
    u = uncertainty.detach().cpu().double()
    err = is_error.detach().cpu().double()
    if not bool(torch.isfinite(u).all()):
        raise EnsembleError("uncertainty must be finite")
    groups = [g for g in torch.tensor_split(torch.argsort(u, stable=True), n_bins) if len(g)]
    xs = [float(u[g].mean()) for g in groups]
    ys = [float(err[g].mean()) for g in groups]
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o")
    ax.set(xlabel="uncertainty (bin mean)", ylabel="error rate", ylim=(-0.02, 1.02))
    title = "Error rate vs uncertainty"
    if 0 < float(err.sum()) < len(err):
        title += f" (AUROC = {float(auroc(u, err.long())):.3f})"
    ax.set_title(title)
    return fig
