"""Ensemble metrics: aggregation, uncertainty, calibration and scores over member outputs.

Conventions:

- Member outputs come member-first. Aggregation and uncertainty functions take classification
  logits of shape ``(num_members, batch, classes)`` and an optional ``weights`` of shape
  ``(num_members,)`` (non-negative, normalised to sum to 1). They refuse members with NaN or inf
  outputs unless ``on_nonfinite="exclude"``, which drops those members (see :func:`check_finite`).
- Scoring functions take the ensemble's probabilities ``(batch, classes)`` (for instance from
  :func:`mean_probs`) and integer targets ``(batch,)``, so any aggregation can be scored.
  They return 0-dim tensors.
- Entropies are in nats, per sample. ``argmax`` ties go to the lowest class index.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from ._errors import EnsembleError

__all__ = [
    "OnNonFinite",
    "Weights",
    "accuracy",
    "adaptive_calibration_error",
    "auroc",
    "brier_score",
    "calibration_bins",
    "check_finite",
    "disagreement",
    "expected_calibration_error",
    "expected_entropy",
    "gaussian_mixture",
    "gaussian_nll",
    "majority_vote",
    "mean_logits",
    "mean_probs",
    "mutual_information",
    "nll",
    "ood_auroc",
    "predictive_entropy",
    "regression_mean_variance",
    "variation_ratio",
]

_LOGITS = "(num_members, batch, classes)"

OnNonFinite: TypeAlias = Literal["raise", "exclude"]
"""What to do with members whose outputs hold NaN or inf: refuse them, or leave them out."""
Weights: TypeAlias = Tensor | Sequence[float] | None
"""Member weights ``(num_members,)``: non-negative, normalised to sum 1; None means equal."""


# ----------------------------------------------------------------------------- validation


def _check_tensor(
    x: object, name: str, ndim: int, layout: str, *, at_least: bool = False
) -> Tensor:
    if not isinstance(x, Tensor):
        raise EnsembleError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if (x.ndim < ndim) if at_least else (x.ndim != ndim):
        need = f"at least {ndim}" if at_least else str(ndim)
        raise EnsembleError(
            f"{name} must have {need} dimensions {layout}, got shape {tuple(x.shape)}"
        )
    return x


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise EnsembleError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_members(x: Tensor, name: str, layout: str) -> None:
    _check_float(x, name)
    if x.shape[0] == 0:
        raise EnsembleError(f"{name} has no members: shape {tuple(x.shape)}, expected {layout}")


def _kept_members(tensors: Sequence[Tensor], names: str, on_nonfinite: str) -> list[int] | None:
    """Indices of the members to keep, or None when every member is finite."""
    if on_nonfinite not in ("raise", "exclude"):
        raise EnsembleError(f"on_nonfinite must be 'raise' or 'exclude', got {on_nonfinite!r}")
    n = tensors[0].shape[0]
    bad = torch.zeros(n, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        finite = torch.isfinite(t)
        bad |= ~(finite.flatten(1).all(dim=1) if t.ndim > 1 else finite)  # (N,)
    if not bool(bad.any()):
        return None
    dropped = torch.nonzero(bad).flatten().tolist()
    if on_nonfinite == "raise":
        raise EnsembleError(
            f"members {dropped} of {n} have non-finite (NaN or inf) values in {names}; "
            "fix them or pass on_nonfinite='exclude' to leave those members out"
        )
    if len(dropped) == n:
        raise EnsembleError(f"all {n} members have non-finite values in {names}; none left")
    return [i for i in range(n) if i not in set(dropped)]


def _normalised_weights(weights: Tensor | Sequence[float], logits: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    n = logits.shape[0]
    if w.shape != (n,):
        raise EnsembleError(
            f"weights must have shape ({n},), one per member of logits {tuple(logits.shape)}, "
            f"got shape {tuple(w.shape)}"
        )
    bad = torch.nonzero(~torch.isfinite(w) | (w < 0)).flatten().tolist()
    if bad:
        raise EnsembleError(f"weights must be finite and non-negative; members {bad} are not")
    return w


def _prepare_logits(
    logits: Tensor, weights: Weights, on_nonfinite: str
) -> tuple[Tensor, Tensor | None]:
    """Validated logits ``(N, B, C)`` and normalised weights ``(N,)`` (None: uniform)."""
    _check_tensor(logits, "logits", 3, _LOGITS)
    _check_members(logits, "logits", _LOGITS)
    if logits.shape[2] == 0:
        raise EnsembleError(f"logits has no classes: shape {tuple(logits.shape)}")
    w = None if weights is None else _normalised_weights(weights, logits)
    kept = _kept_members([logits], "logits", on_nonfinite)
    if kept is not None:
        index = torch.tensor(kept, device=logits.device)
        logits = logits.index_select(0, index)
        w = None if w is None else w.index_select(0, index)
    if w is not None:
        total = w.sum()
        if not bool(total > 0):
            raise EnsembleError("weights of the (kept) members sum to 0; one must be positive")
        w = w / total
    return logits, w


def _member_mean(x: Tensor, w: Tensor | None) -> Tensor:
    """(Weighted) mean over the leading member dimension: ``(N, ...) -> (...)``."""
    return x.mean(0) if w is None else torch.tensordot(w, x, dims=1)


def check_finite(
    outputs: Tensor, on_nonfinite: OnNonFinite = "raise", *, name: str = "outputs"
) -> tuple[Tensor, list[int]]:
    """Finds members whose outputs hold NaN or inf, and refuses or drops them.

    Args:
        outputs: Member outputs of shape ``(num_members, ...)``.
        on_nonfinite: ``"raise"`` raises naming the bad members; ``"exclude"`` drops them.
        name: The argument name used in error messages.

    Returns:
        ``(outputs, kept)``: the outputs of the finite members ``(num_kept, ...)`` (the input
        itself when all are finite) and their member indices.

    Raises:
        EnsembleError: With ``"raise"``, if any member is non-finite; with ``"exclude"``, if all
            are; or if ``outputs`` has no member dimension.

    Example:
        >>> outs = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]])
        >>> check_finite(outs, "exclude")
        (tensor([[1., 2.],
                [3., 4.]]), [0, 2])
    """
    _check_tensor(outputs, name, 1, "(num_members, ...)", at_least=True)
    n = outputs.shape[0]
    kept = _kept_members([outputs], name, on_nonfinite)
    if kept is None:
        return outputs, list(range(n))
    return outputs.index_select(0, torch.tensor(kept, device=outputs.device)), kept


# ----------------------------------------------------------------------------- aggregation


def mean_probs(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """The ensemble's predictive distribution: softmax per member, then the (weighted) mean.

    Args:
        logits: Member logits of shape ``(num_members, batch, classes)``.
        weights: Optional member weights ``(num_members,)``, non-negative; normalised to sum 1.
        on_nonfinite: ``"raise"`` or ``"exclude"`` members with NaN/inf logits.

    Returns:
        Probabilities of shape ``(batch, classes)``.

    Raises:
        EnsembleError: If a shape, the weights or a member's values are wrong.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]]])  # (2, 1, 2)
        >>> mean_probs(logits)
        tensor([[0.3750, 0.6250]])
        >>> mean_probs(logits, weights=[1.0, 0.0])
        tensor([[0.5000, 0.5000]])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    return _member_mean(logits.softmax(dim=-1), w)  # (B, C)


def mean_logits(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """The (weighted) mean of the member logits: ``(num_members, batch, classes)`` in,
    ``(batch, classes)`` out.

    Its softmax is the normalised geometric mean of the member distributions.
    Arguments and errors are those of :func:`mean_probs`.

    Example:
        >>> mean_logits(torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]]))
        tensor([[2., 1.]])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    return _member_mean(logits, w)  # (B, C)


def _vote_count_mean(votes: Tensor, w: Tensor | None) -> Tensor:
    """``_member_mean`` of 0/1 votes ``(N, ...)`` in float64 (float32 on MPS, which has no
    float64): counted in the logits' bfloat16, 257 of 513 votes rounded to the share of 256,
    a false tie."""
    dtype = torch.float64 if votes.device.type != "mps" else torch.float32
    return _member_mean(votes.to(dtype), None if w is None else w.to(dtype))


def _vote_shares(logits: Tensor, w: Tensor | None) -> Tensor:
    """Share of the members (by weight) voting for each class: ``(B, C)``, in float64."""
    votes = F.one_hot(logits.argmax(dim=-1), logits.shape[-1])  # (N, B, C)
    return _vote_count_mean(votes, w)


def majority_vote(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """The class most members (by weight) vote for, each member voting its argmax.

    Ties between classes with equally many votes go to the one with the higher
    :func:`mean_probs`; if those are equal too, to the lower class index. Arguments and errors
    are those of :func:`mean_probs`.

    Returns:
        Class indices of shape ``(batch,)``, dtype ``torch.long``.

    Example:
        >>> logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # one vote each: a tie
        >>> majority_vote(logits)  # class 0 has the higher mean probability
        tensor([0])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    shares = _vote_shares(logits, w)  # (B, C)
    top = shares == shares.amax(dim=-1, keepdim=True)
    probs = _member_mean(logits.softmax(dim=-1), w)  # (B, C)
    return torch.where(top, probs, -1.0).argmax(dim=-1)


# ----------------------------------------------------------------------------- uncertainty


def _entropy(log_p: Tensor) -> Tensor:
    """Entropy in nats over the last dimension, from log-probabilities. A class whose
    probability underflowed to 0 (``log_p`` = -inf, from finite but extreme logits) adds 0,
    as ``0 log 0`` does by convention; NaN still propagates."""
    terms = log_p.exp() * log_p
    terms = torch.where(log_p == -math.inf, 0.0, terms)
    return terms.sum(dim=-1).neg().clamp_min(0)


def _mixture_log_probs(logits: Tensor, w: Tensor | None) -> Tensor:
    log_p = logits.log_softmax(dim=-1)  # (N, B, C)
    if w is None:
        return torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])  # (B, C)
    return torch.logsumexp(log_p + w.log()[:, None, None], dim=0)


def predictive_entropy(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """Total uncertainty: the entropy of :func:`mean_probs`, in nats, per sample ``(batch,)``.

    Equals ``expected_entropy + mutual_information``; at most ``log(classes)``.
    Arguments and errors are those of :func:`mean_probs`.

    Example:
        >>> logits = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])  # two confident members
        >>> predictive_entropy(logits)  # that disagree: log 2
        tensor([0.6931])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    return _entropy(_mixture_log_probs(logits, w))


def expected_entropy(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """Aleatoric uncertainty: the (weighted) mean of the member entropies, in nats ``(batch,)``.

    Arguments and errors are those of :func:`mean_probs`.

    Example:
        >>> logits = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])
        >>> expected_entropy(logits)  # each member is nearly sure
        tensor([0.0005])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    return _member_mean(_entropy(logits.log_softmax(dim=-1)), w)  # (B,)


def mutual_information(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """Epistemic uncertainty: predictive minus expected entropy, clamped at 0, nats ``(batch,)``.

    It is the (weighted) Jensen-Shannon divergence of the member distributions: 0 when all
    members agree. Arguments and errors are those of :func:`mean_probs`.

    Example:
        >>> logits = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])
        >>> mutual_information(logits)
        tensor([0.6926])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    total = _entropy(_mixture_log_probs(logits, w))
    aleatoric = _member_mean(_entropy(logits.log_softmax(dim=-1)), w)
    return (total - aleatoric).clamp_min(0)


def variation_ratio(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """One minus the share of members (by weight) voting for the modal class, per sample.

    0 when all members vote alike; at most ``1 - 1/classes``. Arguments and errors are those
    of :func:`mean_probs`.

    Returns:
        Ratios in ``[0, 1)`` of shape ``(batch,)``.

    Example:
        >>> logits = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])
        >>> variation_ratio(logits)
        tensor([0.5000])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    return (1 - _vote_shares(logits, w).amax(dim=-1)).to(logits.dtype)


def disagreement(
    logits: Tensor, weights: Weights = None, *, on_nonfinite: OnNonFinite = "raise"
) -> Tensor:
    """Share of members (by weight) whose argmax differs from the ensemble's prediction.

    The ensemble's prediction is the argmax of :func:`mean_probs` (not the vote), so this is
    how often members contradict what the ensemble answers; it can exceed
    :func:`variation_ratio` when the averaged prediction is not the modal vote. With ``N``
    unweighted members the values are multiples of ``1/N``. Arguments and errors are those of
    :func:`mean_probs`.

    Returns:
        Shares in ``[0, 1]`` of shape ``(batch,)``.

    Example:
        >>> logits = torch.tensor([[[6.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])
        >>> disagreement(logits)  # the mean favours class 0, two members say 1
        tensor([0.6667])
    """
    logits, w = _prepare_logits(logits, weights, on_nonfinite)
    ensemble = _member_mean(logits.softmax(dim=-1), w).argmax(dim=-1)  # (B,)
    differs = logits.argmax(dim=-1) != ensemble  # (N, B)
    return _vote_count_mean(differs, w).to(logits.dtype)


# ----------------------------------------------------------------------------- scores


def _check_scoring(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Validated probabilities ``(B, C)`` (at least float32) and long targets ``(B,)``."""
    _check_tensor(probs, "probs", 2, "(batch, classes)")
    _check_float(probs, "probs")
    _check_tensor(targets, "targets", 1, "(batch,)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise EnsembleError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    b, c = probs.shape
    if targets.shape[0] != b:
        raise EnsembleError(
            f"targets and probs must have the same batch size: targets shape "
            f"{tuple(targets.shape)}, probs shape {tuple(probs.shape)}"
        )
    if b == 0 or c == 0:
        raise EnsembleError(
            f"probs must hold at least one sample and class, got {tuple(probs.shape)}"
        )
    p = probs.to(torch.promote_types(probs.dtype, torch.float32))
    row_error = (p.sum(dim=-1) - 1).abs()  # (B,)
    tolerance = max(1e-3, c * torch.finfo(probs.dtype).eps)
    bad = ~torch.isfinite(p).all(dim=-1) | (p < 0).any(dim=-1) | (row_error > tolerance)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0])
        raise EnsembleError(
            f"probs must be finite, non-negative and sum to 1 over classes; row {row} of probs "
            f"{tuple(probs.shape)} has min {float(p[row].min()):.4g} and sum "
            f"{float(p[row].sum()):.4g} (to score logits, pass mean_probs(logits))"
        )
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= c:
        raise EnsembleError(
            f"targets must be class indices in [0, {c}), got values in [{low}, {high}]"
        )
    return p, targets.long()


def accuracy(probs: Tensor, targets: Tensor) -> Tensor:
    """Share of samples whose most probable class is the target.

    Args:
        probs: Probabilities of shape ``(batch, classes)``, e.g. :func:`mean_probs`.
        targets: Class indices of shape ``(batch,)``.

    Returns:
        A 0-dim tensor in ``[0, 1]``.

    Raises:
        EnsembleError: If the shapes disagree, ``probs`` are not probabilities (e.g. logits),
            or a target is not a class index.

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
        tensor(0.5000)
    """
    p, t = _check_scoring(probs, targets)
    return (p.argmax(dim=-1) == t).to(p.dtype).mean()


def nll(probs: Tensor, targets: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Mean negative log-likelihood of the targets, ``-mean(log(max(p_target, eps)))``.

    Arguments and errors are those of :func:`accuracy`; ``eps`` keeps a zero probability finite.

    Example:
        >>> nll(torch.tensor([[0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1]))
        tensor(0.4904)
    """
    if not 0 < eps < 1:
        raise EnsembleError(f"eps must be in (0, 1), got {eps}")
    p, t = _check_scoring(probs, targets)
    p_target = p.gather(1, t[:, None]).squeeze(1)  # (B,)
    return -p_target.clamp_min(eps).log().mean()


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Multi-class Brier score: mean over samples of ``sum_c (p_c - onehot_c)^2``, in ``[0, 2]``.

    For two classes this is twice scikit-learn's binary ``brier_score_loss(y, p[:, 1])``.
    Arguments and errors are those of :func:`accuracy`.

    Example:
        >>> brier_score(torch.tensor([[0.75, 0.25]]), torch.tensor([0]))
        tensor(0.1250)
    """
    p, t = _check_scoring(probs, targets)
    return (p - F.one_hot(t, p.shape[1]).to(p.dtype)).square().sum(dim=-1).mean()


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise EnsembleError(f"n_bins must be a positive int, got {n_bins!r}")


def _bin_stats(
    conf: Tensor, correct: Tensor, bins: Tensor, n_bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    count = torch.bincount(bins, minlength=n_bins)  # (n_bins,)
    denom = count.clamp_min(1).to(conf.dtype)
    zeros = torch.zeros(n_bins, dtype=conf.dtype, device=conf.device)
    mean_conf = zeros.scatter_add(0, bins, conf) / denom
    mean_acc = zeros.scatter_add(0, bins, correct) / denom
    return mean_conf, mean_acc, count


def _calibration_error(mean_conf: Tensor, mean_acc: Tensor, count: Tensor) -> Tensor:
    share = count.to(mean_conf.dtype) / count.sum()
    return (share * (mean_acc - mean_conf).abs()).sum()  # empty bins: share 0


def calibration_bins(
    probs: Tensor, targets: Tensor, n_bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-label confidence and accuracy in ``n_bins`` equal-width confidence bins.

    Bin ``k`` holds confidences in ``[k/n_bins, (k+1)/n_bins)``; a confidence of exactly 1
    goes in the last bin. Arguments and errors are those of :func:`accuracy`.

    Returns:
        ``(confidence, accuracy, count)``, each of shape ``(n_bins,)``: the mean top-label
        probability and the accuracy in each bin (0 for empty bins) and the sample counts.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
        (tensor([0.0000, 0.7333]), tensor([0.0000, 0.6667]), tensor([0, 3]))
    """
    _check_n_bins(n_bins)
    p, t = _check_scoring(probs, targets)
    conf, pred = p.max(dim=-1)  # (B,)
    bins = (conf * n_bins).floor().long().clamp(0, n_bins - 1)
    return _bin_stats(conf, (pred == t).to(p.dtype), bins, n_bins)


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error over equal-width bins of the top-label confidence.

    ``sum_k (n_k / batch) * |accuracy_k - confidence_k|`` over the bins of
    :func:`calibration_bins`; empty bins contribute 0. Arguments and errors are those of
    :func:`accuracy`.

    Returns:
        A 0-dim tensor in ``[0, 1]``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> expected_calibration_error(probs, torch.tensor([0, 1, 1]), n_bins=2)
        tensor(0.0667)
    """
    return _calibration_error(*calibration_bins(probs, targets, n_bins))


def adaptive_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """Calibration error over equal-mass bins of the top-label confidence.

    Samples are sorted by confidence (stable: ties keep their order) and split into ``n_bins``
    groups whose sizes differ by at most one, as ``numpy.array_split`` does; each bin is
    weighted by its share of samples. This is the top-label equal-mass variant, not the
    class-wise ACE of Nixon et al. (2019). With fewer samples than bins, the empty bins
    contribute 0. Arguments and errors are those of :func:`accuracy`.

    Returns:
        A 0-dim tensor in ``[0, 1]``.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
        >>> adaptive_calibration_error(probs, torch.tensor([0, 1, 1, 0]), n_bins=2)
        tensor(0.2500)
    """
    _check_n_bins(n_bins)
    p, t = _check_scoring(probs, targets)
    conf, pred = p.max(dim=-1)  # (B,)
    b = conf.shape[0]
    size, extra = divmod(b, n_bins)  # the first `extra` bins hold size + 1 samples
    rank = torch.arange(b, device=conf.device)
    cut = extra * (size + 1)
    bin_of_rank = torch.where(rank < cut, rank // (size + 1), extra + (rank - cut) // max(size, 1))
    bins = torch.empty_like(rank)
    bins[torch.argsort(conf, stable=True)] = bin_of_rank
    return _calibration_error(*_bin_stats(conf, (pred == t).to(p.dtype), bins, n_bins))


def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve of ``scores`` for telling positives (label 1) from negatives.

    The probability that a random positive scores higher than a random negative, ties counting
    one half (the Mann-Whitney statistic with average ranks; equal to scikit-learn's
    ``roc_auc_score``). Use it with an uncertainty as the score and ``is_error`` or ``is_ood``
    as the labels.

    Args:
        scores: Real scores of shape ``(samples,)``, higher meaning "more likely positive".
        labels: 0/1 or bool labels of shape ``(samples,)``.

    Returns:
        A 0-dim tensor in ``[0, 1]`` (at least float32).

    Raises:
        EnsembleError: If the shapes differ, a score is NaN, a label is not 0/1, or only one
            class is present.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.8750)
    """
    _check_tensor(scores, "scores", 1, "(samples,)")
    _check_tensor(labels, "labels", 1, "(samples,)")
    if scores.shape != labels.shape:
        raise EnsembleError(
            f"scores and labels must have the same shape: scores {tuple(scores.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if scores.is_complex() or bool(torch.isnan(scores).any()):
        raise EnsembleError(f"scores must be real and not NaN, got dtype {scores.dtype} with NaN")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise EnsembleError("labels must be 0/1 or bool (1 = positive)")
    positive = (labels == 1).long()  # (M,)
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise EnsembleError(
            f"auroc needs both classes in labels, got {n_pos} positives and {n_neg} negatives"
        )
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    pos = torch.zeros_like(counts).scatter_add(0, inverse, positive)  # per distinct score
    neg = counts - pos
    neg_below = torch.cumsum(neg, dim=0) - neg
    twice_wins = int((pos * (2 * neg_below + neg)).sum())  # exact integer arithmetic
    value = twice_wins / (2 * n_pos * n_neg)
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return torch.tensor(value, dtype=dtype, device=scores.device)


def ood_auroc(score_in: Tensor, score_out: Tensor) -> Tensor:
    """AUROC of a score (e.g. :func:`predictive_entropy`) for flagging out-of-distribution inputs.

    Args:
        score_in: Scores of in-distribution samples ``(samples_in,)``.
        score_out: Scores of out-of-distribution samples ``(samples_out,)``; the positives.

    Returns:
        A 0-dim tensor: 1 when every OOD sample scores above every in-distribution one.

    Raises:
        EnsembleError: If either is empty or not 1-D, or a score is NaN.

    Example:
        >>> ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.15, 0.9]))
        tensor(0.7500)
    """
    _check_tensor(score_in, "score_in", 1, "(samples_in,)")
    _check_tensor(score_out, "score_out", 1, "(samples_out,)")
    labels = torch.cat(
        [torch.zeros_like(score_in, dtype=torch.long), torch.ones_like(score_out, dtype=torch.long)]
    )
    return auroc(torch.cat([score_in, score_out]), labels)


# ----------------------------------------------------------------------------- regression


def regression_mean_variance(
    preds: Tensor, *, on_nonfinite: OnNonFinite = "raise"
) -> tuple[Tensor, Tensor]:
    """Mean and epistemic variance of the members' point predictions.

    The variance is the population variance over members (``correction=0``, dividing by
    ``N``): it describes this ensemble's spread, is 0 for one member, and adds up with the
    mean of member variances in :func:`gaussian_mixture`.

    Args:
        preds: Member predictions of shape ``(num_members, batch, ...)``.
        on_nonfinite: ``"raise"`` or ``"exclude"`` members with NaN/inf predictions.

    Returns:
        ``(mean, variance)``, each of shape ``(batch, ...)``.

    Raises:
        EnsembleError: If ``preds`` has fewer than 2 dimensions, is not floating point, or
            has non-finite members (with ``"raise"``).

    Example:
        >>> regression_mean_variance(torch.tensor([[1.0], [3.0]]))
        (tensor([2.]), tensor([1.]))
    """
    _check_tensor(preds, "preds", 2, "(num_members, batch, ...)", at_least=True)
    _check_members(preds, "preds", "(num_members, batch, ...)")
    preds, _ = check_finite(preds, on_nonfinite, name="preds")
    return preds.mean(dim=0), preds.var(dim=0, correction=0)


def gaussian_mixture(
    means: Tensor, variances: Tensor, *, on_nonfinite: OnNonFinite = "raise"
) -> tuple[Tensor, Tensor]:
    """Moments of the equal-weight mixture of the members' Gaussian predictions.

    Total variance = mean of the member variances (aleatoric) + population variance of the
    member means (epistemic).

    Args:
        means: Member means of shape ``(num_members, batch, ...)``.
        variances: Member variances, same shape, non-negative.
        on_nonfinite: ``"raise"`` or ``"exclude"`` members with NaN/inf in either input.

    Returns:
        ``(mean, total_variance)``, each of shape ``(batch, ...)``.

    Raises:
        EnsembleError: If the shapes differ, a variance is negative, or (with ``"raise"``) a
            member is non-finite.

    Example:
        >>> gaussian_mixture(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]]))
        (tensor([1.]), tensor([3.]))
    """
    layout = "(num_members, batch, ...)"
    _check_tensor(means, "means", 2, layout, at_least=True)
    _check_tensor(variances, "variances", 2, layout, at_least=True)
    if means.shape != variances.shape:
        raise EnsembleError(
            f"means and variances must have the same shape: means {tuple(means.shape)}, "
            f"variances {tuple(variances.shape)}"
        )
    _check_members(means, "means", layout)
    _check_float(variances, "variances")
    kept = _kept_members([means, variances], "means/variances", on_nonfinite)
    if kept is not None:
        index = torch.tensor(kept, device=means.device)
        means, variances = means.index_select(0, index), variances.index_select(0, index)
    if bool((variances < 0).any()):
        raise EnsembleError("variances must be non-negative")
    return means.mean(dim=0), variances.mean(dim=0) + means.var(dim=0, correction=0)


def gaussian_nll(mean: Tensor, var: Tensor, target: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Mean Gaussian negative log-likelihood, ``0.5 * (log(2 pi var) + (target - mean)^2 / var)``.

    The constant is included, so this is the true negative log density (torch's
    ``gaussian_nll_loss`` with ``full=True``). Variances below ``eps`` are raised to ``eps``.

    Args:
        mean: Predicted means of any shape, e.g. ``(batch, ...)`` from :func:`gaussian_mixture`.
        var: Predicted variances, same shape, non-negative.
        target: Targets, same shape.
        eps: Smallest variance used.

    Returns:
        A 0-dim tensor: the mean over all elements.

    Raises:
        EnsembleError: If the shapes differ or are empty, a value is NaN or inf, or ``var`` is
            negative.

    Example:
        >>> gaussian_nll(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]))
        tensor(1.4189)
    """
    for name, x in (("mean", mean), ("var", var), ("target", target)):
        _check_tensor(x, name, 0, "(batch, ...)", at_least=True)
        _check_float(x, name)
        if not bool(torch.isfinite(x).all()):
            raise EnsembleError(f"{name} has NaN or inf values")
    if not mean.shape == var.shape == target.shape:
        raise EnsembleError(
            f"mean, var and target must have the same shape: mean {tuple(mean.shape)}, "
            f"var {tuple(var.shape)}, target {tuple(target.shape)}"
        )
    if mean.numel() == 0:
        raise EnsembleError(f"mean, var and target are empty: shape {tuple(mean.shape)}")
    if bool((var < 0).any()):
        raise EnsembleError("var must be non-negative")
    if not eps > 0:
        raise EnsembleError(f"eps must be positive, got {eps}")
    v = var.clamp_min(eps)
    return 0.5 * (math.log(2 * math.pi) + v.log() + (target - mean).square() / v).mean()
