"""Tests for vensemble.metrics: every metric against a float64 NumPy or scikit-learn reference."""

from __future__ import annotations

import doctest
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

import vensemble.metrics as vm
from vensemble._errors import EnsembleError

# ----------------------------------------------------------------------------- references


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_entropy(p: np.ndarray) -> np.ndarray:
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(p * np.log(safe), axis=-1)


def np_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def reference(name: str, logits: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Float64 reference of the aggregation/uncertainty metric `name` on logits (N, B, C)."""
    n, _, c = logits.shape
    w = np_weights(weights, n)
    p = np_softmax(logits)  # (N, B, C)
    mean_p = np.einsum("n,nbc->bc", w, p)
    votes = np.einsum("n,nbc->bc", w, np.eye(c)[logits.argmax(-1)])  # (B, C)
    if name == "mean_probs":
        return mean_p
    if name == "mean_logits":
        return np.einsum("n,nbc->bc", w, logits)
    if name == "majority_vote":
        top = np.isclose(votes, votes.max(-1, keepdims=True), rtol=0, atol=1e-9)
        return np.where(top, mean_p, -1.0).argmax(-1)
    if name == "predictive_entropy":
        return np_entropy(mean_p)
    if name == "expected_entropy":
        return w @ np_entropy(p)
    if name == "mutual_information":
        return np.maximum(np_entropy(mean_p) - w @ np_entropy(p), 0.0)
    if name == "variation_ratio":
        return 1.0 - votes.max(-1)
    if name == "disagreement":
        return w @ (logits.argmax(-1) != mean_p.argmax(-1)).astype(np.float64)
    raise AssertionError(name)


LOGIT_METRICS = [
    "mean_probs",
    "mean_logits",
    "majority_vote",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
    "disagreement",
]


def random_logits(n: int, b: int, c: int, seed: int, scale: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # float32-representable values, so the float32 input and the float64 reference agree
    return (rng.normal(size=(n, b, c)) * scale).astype(np.float32).astype(np.float64)


def assert_close(actual: torch.Tensor, expected: np.ndarray | float, atol: float = 2e-5) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=1e-5, atol=atol)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("name", LOGIT_METRICS)
@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("c", [2, 5])
@pytest.mark.parametrize("weighted", [False, True])
def test_logit_metrics_match_numpy(name: str, n: int, c: int, weighted: bool) -> None:
    logits = random_logits(n, 64, c, seed=10 * n + c)
    weights = np.random.default_rng(n).uniform(0.2, 2.0, size=n) if weighted else None
    fn = getattr(vm, name)
    w = None if weights is None else torch.tensor(weights, dtype=torch.float32)
    out = fn(torch.tensor(logits, dtype=torch.float32), w)
    expected = reference(name, logits, weights)
    assert out.shape == expected.shape
    if name == "majority_vote":
        assert out.dtype == torch.long
        np.testing.assert_array_equal(out.numpy(), expected)
    else:
        assert out.dtype == torch.float32
        assert_close(out, expected)


@pytest.mark.parametrize("name", LOGIT_METRICS)
def test_float64_logits_stay_float64(name: str) -> None:
    logits = random_logits(3, 8, 4, seed=1)
    out = getattr(vm, name)(torch.tensor(logits))
    expected = reference(name, logits, None)
    if name != "majority_vote":
        assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_single_member_has_no_epistemic_uncertainty() -> None:
    logits = torch.tensor(random_logits(1, 32, 4, seed=2), dtype=torch.float32)
    assert torch.equal(vm.mutual_information(logits), torch.zeros(32))
    assert torch.equal(vm.variation_ratio(logits), torch.zeros(32))
    assert torch.equal(vm.disagreement(logits), torch.zeros(32))
    assert torch.equal(vm.majority_vote(logits), logits[0].argmax(-1))
    torch.testing.assert_close(vm.predictive_entropy(logits), vm.expected_entropy(logits))
    torch.testing.assert_close(vm.mean_probs(logits), logits[0].softmax(-1))


def test_identical_members_have_zero_mutual_information() -> None:
    # rounding makes predictive - expected entropy slightly negative here; the result is clamped
    logits = torch.tensor(random_logits(1, 2000, 10, seed=5), dtype=torch.float32).expand(7, -1, -1)
    mi = vm.mutual_information(logits)
    assert (mi >= 0).all()
    assert mi.max() < 1e-6
    assert torch.equal(vm.disagreement(logits), torch.zeros(2000))


@pytest.mark.parametrize("n", [1, 4])
def test_one_class_dominating(n: int) -> None:
    # Probabilities that underflow to exactly 0 must give entropy 0, not NaN.
    logits = torch.zeros(n, 5, 3)
    logits[..., 0] = 1e4
    for name in ["predictive_entropy", "expected_entropy", "mutual_information"]:
        assert torch.equal(getattr(vm, name)(logits), torch.zeros(5)), name
    assert torch.equal(vm.mean_probs(logits), torch.tensor([[1.0, 0.0, 0.0]] * 5))
    assert torch.equal(vm.majority_vote(logits), torch.zeros(5, dtype=torch.long))


def test_confident_members_that_disagree() -> None:
    logits = np.array([[[1e3, -1e3]], [[-1e3, 1e3]]])  # (2, 1, 2)
    x = torch.tensor(logits, dtype=torch.float32)
    assert_close(vm.predictive_entropy(x), [math.log(2)])
    assert_close(vm.expected_entropy(x), [0.0])
    assert_close(vm.mutual_information(x), [math.log(2)])
    assert_close(vm.variation_ratio(x), [0.5])
    # mean probs tie exactly: the ensemble predicts class 0; member 1 disagrees
    assert_close(vm.disagreement(x), [0.5])


@pytest.mark.parametrize(
    ("logits", "expected"),
    [
        # one vote each: the member with the stronger opinion wins
        ([[[0.1, 0.0]], [[0.0, 3.0]]], 1),
        ([[[3.0, 0.0]], [[0.0, 0.1]]], 0),
        # a 2-2 tie between classes 1 and 2, which has the higher mean probability
        ([[[0, 1.0, 0]], [[0, 1.0, 0]], [[0, 0, 1.0]], [[0, 0, 9.0]]], 2),
        ([[[0, 9.0, 0]], [[0, 1.0, 0]], [[0, 0, 1.0]], [[0, 0, 1.0]]], 1),
        # 2 votes beat 1 even with a lower mean probability
        ([[[0.1, 0.0]], [[0.1, 0.0]], [[0.0, 20.0]]], 0),
        # a full tie (equal votes and equal mean probabilities) goes to the lowest index
        ([[[1.0, 0.0]], [[0.0, 1.0]]], 0),
    ],
)
def test_majority_vote_ties(logits: list, expected: int) -> None:
    out = vm.majority_vote(torch.tensor(logits))
    assert out.tolist() == [expected]


def test_weighted_vote_and_weights_semantics() -> None:
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 2.0]], [[0.0, 2.0]]])
    assert vm.majority_vote(logits).tolist() == [1]
    assert vm.majority_vote(logits, [3.0, 1.0, 1.0]).tolist() == [0]
    assert_close(vm.variation_ratio(logits, [3.0, 1.0, 1.0]), [0.4])
    x = torch.tensor(random_logits(4, 16, 3, seed=3), dtype=torch.float32)
    # a zero weight is the same as leaving the member out; weights are scale-free
    torch.testing.assert_close(
        vm.mean_probs(x, [1.0, 0.0, 2.0, 1.0]), vm.mean_probs(x[[0, 2, 3]], [1.0, 2.0, 1.0])
    )
    torch.testing.assert_close(vm.mean_probs(x, torch.full((4,), 5.0)), vm.mean_probs(x))


def test_mean_probs_is_differentiable() -> None:
    logits = torch.randn(3, 4, 5, requires_grad=True)
    vm.mutual_information(logits).sum().backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_empty_batch_gives_empty_outputs() -> None:
    logits = torch.zeros(3, 0, 4)
    assert vm.mean_probs(logits).shape == (0, 4)
    assert vm.majority_vote(logits).shape == (0,)
    assert vm.mutual_information(logits).shape == (0,)


# ----------------------------------------------------------------------------- non-finite


def test_check_finite_raise_names_members() -> None:
    outs = torch.zeros(5, 2, 3)
    outs[1, 0, 2] = float("nan")
    outs[3, 1, 0] = float("-inf")
    with pytest.raises(EnsembleError, match=r"members \[1, 3\] of 5 .*outputs"):
        vm.check_finite(outs)
    kept_outs, kept = vm.check_finite(outs, "exclude")
    assert kept == [0, 2, 4]
    assert torch.equal(kept_outs, outs[[0, 2, 4]])


def test_check_finite_when_all_finite_returns_input() -> None:
    outs = torch.randn(3, 4)
    same, kept = vm.check_finite(outs, "exclude")
    assert same is outs
    assert kept == [0, 1, 2]


def test_check_finite_errors() -> None:
    with pytest.raises(EnsembleError, match="all 2 members"):
        vm.check_finite(torch.full((2, 3), float("nan")), "exclude")
    with pytest.raises(EnsembleError, match="on_nonfinite must be 'raise' or 'exclude'"):
        vm.check_finite(torch.zeros(2, 3), "drop")  # type: ignore[arg-type]
    with pytest.raises(EnsembleError, match=r"preds must have at least 1 dimensions"):
        vm.check_finite(torch.tensor(1.0), name="preds")


@pytest.mark.parametrize("name", LOGIT_METRICS)
def test_nonfinite_members_raise_or_are_excluded(name: str) -> None:
    clean = random_logits(4, 6, 3, seed=4)
    logits = torch.tensor(clean, dtype=torch.float32)
    logits[2, 3, 1] = float("inf")
    fn: Callable[..., torch.Tensor] = getattr(vm, name)
    with pytest.raises(EnsembleError, match=r"members \[2\] of 4 .*logits.*on_nonfinite='exclude'"):
        fn(logits)
    weights = [1.0, 2.0, 3.0, 4.0]
    kept = clean[[0, 1, 3]]
    out = fn(logits, weights, on_nonfinite="exclude")
    expected = reference(name, kept, np.array([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=2e-5)


def test_excluding_leaves_only_zero_weights() -> None:
    logits = torch.zeros(2, 1, 2)
    logits[0, 0, 0] = float("nan")
    with pytest.raises(EnsembleError, match="sum to 0"):
        vm.mean_probs(logits, [1.0, 0.0], on_nonfinite="exclude")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: vm.mean_probs(torch.zeros(4, 3)), r"logits must have 3 dimensions .*\(4, 3\)"),
        (lambda: vm.mean_probs(np.zeros((2, 3, 4))), "logits must be a torch.Tensor"),  # type: ignore[arg-type]
        (lambda: vm.mean_probs(torch.zeros(2, 3, 4, dtype=torch.long)), "floating-point"),
        (lambda: vm.mean_probs(torch.zeros(0, 3, 4)), r"no members: shape \(0, 3, 4\)"),
        (lambda: vm.mean_probs(torch.zeros(2, 3, 0)), "no classes"),
        (
            lambda: vm.mean_probs(torch.zeros(3, 2, 4), [1.0, 1.0]),
            r"weights must have shape \(3,\).*\(3, 2, 4\).*\(2,\)",
        ),
        (lambda: vm.mean_probs(torch.zeros(2, 2, 4), [1.0, -1.0]), r"members \[1\]"),
        (lambda: vm.mean_probs(torch.zeros(2, 2, 4), [float("nan"), 1.0]), r"members \[0\]"),
        (lambda: vm.mean_probs(torch.zeros(2, 2, 4), [0.0, 0.0]), "sum to 0"),
        (lambda: vm.predictive_entropy(torch.zeros(2, 2, 4), on_nonfinite="skip"), "on_nonfinite"),  # type: ignore[arg-type]
    ],
)
def test_aggregation_input_errors(call: Callable[[], object], match: str) -> None:
    with pytest.raises(EnsembleError, match=match):
        call()


P = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
T = torch.tensor([0, 1, 1])


@pytest.mark.parametrize(
    "score",
    [
        vm.accuracy,
        vm.nll,
        vm.brier_score,
        vm.expected_calibration_error,
        vm.adaptive_calibration_error,
        vm.calibration_bins,
    ],
)
@pytest.mark.parametrize(
    ("probs", "targets", "match"),
    [
        (P, T[:2], r"same batch size: targets shape \(2,\), probs shape \(3, 2\)"),
        (P[None], T, r"probs must have 2 dimensions .*\(1, 3, 2\)"),
        (P, T[:, None], r"targets must have 1 dimensions .*\(3, 1\)"),
        (P, T.float(), "integer class indices"),
        (P, torch.tensor([0, 2, 1]), r"class indices in \[0, 2\), got values in \[0, 2\]"),
        (P * 3 - 1, T, r"sum to 1 .*row 0 of probs \(3, 2\) .*mean_probs\(logits\)"),
        (torch.tensor([[1.2, -0.2], [0.5, 0.5], [0.5, 0.5]]), T, "non-negative"),
        (torch.tensor([[float("nan"), 1.0], [0.5, 0.5], [0.5, 0.5]]), T, "finite"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "at least one sample"),
        (P.long(), T, "floating-point"),
    ],
)
def test_scoring_input_errors(
    score: Callable[..., object], probs: torch.Tensor, targets: torch.Tensor, match: str
) -> None:
    with pytest.raises(EnsembleError, match=match):
        score(probs, targets)


@pytest.mark.parametrize("n_bins", [0, -1, True, 2.5])
def test_bad_n_bins(n_bins: object) -> None:
    for fn in (vm.expected_calibration_error, vm.adaptive_calibration_error, vm.calibration_bins):
        with pytest.raises(EnsembleError, match="n_bins must be a positive int"):
            fn(P, T, n_bins)  # type: ignore[arg-type]


def test_nll_bad_eps() -> None:
    with pytest.raises(EnsembleError, match="eps"):
        vm.nll(P, T, eps=0.0)


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="logits"):
        vm.mean_probs(torch.zeros(3))


# ----------------------------------------------------------------------------- scores


def random_probs(
    b: int, c: int, seed: int, concentration: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, concentration), size=b)
    # targets drawn from the probabilities, so the predictions are roughly calibrated
    targets = np.array([rng.choice(c, p=p) for p in probs])
    return probs, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [2, 6])
def test_accuracy_nll_brier_match_references(dtype: torch.dtype, c: int) -> None:
    probs, targets = random_probs(200, c, seed=c)
    p, t = torch.tensor(probs, dtype=dtype), torch.tensor(targets)
    assert_close(vm.accuracy(p, t), np.mean(probs.argmax(-1) == targets))
    assert_close(vm.nll(p, t), log_loss(targets, probs, labels=list(range(c))))
    onehot = np.eye(c)[targets]
    assert_close(vm.brier_score(p, t), np.mean(np.sum((probs - onehot) ** 2, axis=-1)))
    if c == 2:  # scikit-learn's binary Brier score is half the multi-class one
        assert_close(vm.brier_score(p, t), 2 * brier_score_loss(targets, probs[:, 1]))
    assert vm.nll(p, t).dtype == dtype


def test_scores_of_mean_probs() -> None:
    logits = random_logits(5, 50, 3, seed=6)
    targets = np.random.default_rng(6).integers(0, 3, size=50)
    probs = reference("mean_probs", logits, None)
    p = vm.mean_probs(torch.tensor(logits, dtype=torch.float32))
    assert_close(vm.nll(p, torch.tensor(targets)), log_loss(targets, probs, labels=[0, 1, 2]))


def test_nll_clamps_zero_probability() -> None:
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    t = torch.tensor([1, 0])
    assert_close(vm.nll(p, t), (-math.log(1e-12) - math.log(0.5)) / 2, atol=1e-4)
    assert_close(vm.nll(p, t, eps=1e-3), (-math.log(1e-3) - math.log(0.5)) / 2)


def test_accuracy_ties_go_to_lowest_class() -> None:
    assert vm.accuracy(torch.tensor([[0.5, 0.5]]), torch.tensor([0])).item() == 1.0
    assert vm.accuracy(torch.tensor([[0.5, 0.5]]), torch.tensor([1])).item() == 0.0


def np_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    conf, correct = probs.max(-1), probs.argmax(-1) == targets
    bins = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        in_bin = bins == k
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


def np_ace(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    conf, correct = probs.max(-1), probs.argmax(-1) == targets
    total = 0.0
    for group in np.array_split(np.argsort(conf, kind="stable"), n_bins):
        if len(group):
            total += len(group) / len(conf) * abs(correct[group].mean() - conf[group].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
@pytest.mark.parametrize(("b", "c", "concentration"), [(300, 4, 1.0), (50, 3, 0.1), (7, 2, 1.0)])
def test_calibration_errors_match_numpy(n_bins: int, b: int, c: int, concentration: float) -> None:
    probs, targets = random_probs(b, c, seed=n_bins + b, concentration=concentration)
    targets[::3] = 0  # make the model miscalibrated
    p, t = torch.tensor(probs, dtype=torch.float32), torch.tensor(targets)
    probs32 = p.double().numpy()  # binning sees the float32 confidences
    assert_close(vm.expected_calibration_error(p, t, n_bins), np_ece(probs32, targets, n_bins))
    assert_close(vm.adaptive_calibration_error(p, t, n_bins), np_ace(probs32, targets, n_bins))


def test_calibration_bins_edges_and_empty_bins() -> None:
    # confidences 0.5, 0.75, 1.0 and 1.0 with 4 bins: bins 0 and 1 hold nothing,
    # 0.5 goes in bin 2 ([0.5, 0.75)), 0.75 and exactly 1.0 go in the last bin
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 0, 0, 1])
    conf, acc, count = vm.calibration_bins(probs, targets, n_bins=4)
    assert count.tolist() == [0, 0, 1, 3]
    assert_close(conf, [0.0, 0.0, 0.5, 2.75 / 3])
    assert_close(acc, [0.0, 0.0, 1.0, 2 / 3])
    ece = 1 / 4 * 0.5 + 3 / 4 * abs(2 / 3 - 2.75 / 3)
    assert_close(vm.expected_calibration_error(probs, targets, n_bins=4), ece)
    assert_close(
        vm.expected_calibration_error(probs, targets, n_bins=4),
        np_ece(probs.double().numpy(), targets.numpy(), 4),
    )


def test_calibration_of_perfect_and_worst_predictions() -> None:
    sure = torch.eye(3)[[0, 1, 2, 1]]
    t = torch.tensor([0, 1, 2, 1])
    assert vm.expected_calibration_error(sure, t).item() == 0.0
    assert vm.adaptive_calibration_error(sure, t).item() == 0.0
    assert vm.expected_calibration_error(sure, (t + 1) % 3).item() == 1.0


def test_adaptive_bins_with_fewer_samples_than_bins() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    t = torch.tensor([0, 0, 0])
    # each sample alone in a bin: the mean of |correct - confidence|
    assert_close(vm.adaptive_calibration_error(probs, t, n_bins=15), (0.1 + 0.8 + 0.4) / 3)


@pytest.mark.parametrize("m", [2, 10, 300])
@pytest.mark.parametrize("tied", [False, True])
def test_auroc_matches_sklearn(m: int, tied: bool) -> None:
    rng = np.random.default_rng(m)
    labels = np.arange(m) % 2
    rng.shuffle(labels)
    scores = labels * 0.7 + rng.normal(size=m)
    if tied:
        scores = np.round(scores)  # many equal scores across both classes
    expected = roc_auc_score(labels, scores)
    s32 = torch.tensor(scores, dtype=torch.float32)
    assert_close(vm.auroc(s32, torch.tensor(labels)), expected, atol=1e-6)
    assert_close(
        vm.auroc(torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)), expected, atol=1e-12
    )


def test_auroc_extremes_and_integer_scores() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert vm.auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), labels).item() == 1.0
    assert vm.auroc(torch.tensor([4.0, 3.0, 2.0, 1.0]), labels).item() == 0.0
    assert vm.auroc(torch.ones(4), labels).item() == 0.5
    assert vm.auroc(torch.tensor([0, 1, 1, 2]), labels).item() == roc_auc_score(
        [0, 0, 1, 1], [0, 1, 1, 2]
    )


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (torch.rand(4), torch.ones(4), r"both classes .*4 positives and 0 negatives"),
        (torch.rand(4), torch.zeros(4, dtype=torch.bool), r"0 positives and 4 negatives"),
        (torch.rand(4), torch.tensor([0, 1, 2, 1]), "0/1"),
        (torch.rand(4), torch.tensor([0, 1, 1]), r"same shape: scores \(4,\), labels \(3,\)"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), "NaN"),
        (torch.rand(2, 2), torch.tensor([0, 1]), r"scores must have 1 dimensions"),
    ],
)
def test_auroc_errors(scores: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(EnsembleError, match=match):
        vm.auroc(scores, labels)


def test_ood_auroc() -> None:
    rng = np.random.default_rng(7)
    s_in, s_out = rng.normal(size=40), rng.normal(loc=1.0, size=25)
    expected = roc_auc_score(np.r_[np.zeros(40), np.ones(25)], np.r_[s_in, s_out])
    assert_close(vm.ood_auroc(torch.tensor(s_in), torch.tensor(s_out)), expected, atol=1e-12)
    with pytest.raises(EnsembleError, match="both classes"):
        vm.ood_auroc(torch.tensor(s_in), torch.zeros(0, dtype=torch.float64))


# ----------------------------------------------------------------------------- regression


@pytest.mark.parametrize("shape", [(1, 9), (3, 9), (7, 5, 2)])
def test_regression_mean_variance(shape: tuple[int, ...]) -> None:
    preds = np.random.default_rng(8).normal(size=shape)
    mean, var = vm.regression_mean_variance(torch.tensor(preds))
    np.testing.assert_allclose(mean.numpy(), preds.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), preds.var(0, ddof=0), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("shape", [(1, 9), (4, 9), (5, 3, 2)])
def test_gaussian_mixture(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(9)
    means, variances = rng.normal(size=shape), rng.uniform(0.1, 2.0, size=shape)
    mean, total = vm.gaussian_mixture(torch.tensor(means), torch.tensor(variances))
    np.testing.assert_allclose(mean.numpy(), means.mean(0), rtol=1e-12)
    np.testing.assert_allclose(total.numpy(), variances.mean(0) + means.var(0), rtol=1e-10)


def test_regression_nonfinite_members() -> None:
    preds = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 6.0]])
    with pytest.raises(EnsembleError, match=r"members \[1\] of 3 .*preds"):
        vm.regression_mean_variance(preds)
    mean, var = vm.regression_mean_variance(preds, on_nonfinite="exclude")
    assert mean.tolist() == [2.0, 4.0]
    assert var.tolist() == [1.0, 4.0]
    variances = torch.ones(3, 2)
    variances[2, 1] = float("inf")
    with pytest.raises(EnsembleError, match=r"members \[1, 2\] of 3 .*means/variances"):
        vm.gaussian_mixture(preds, variances)
    mean, total = vm.gaussian_mixture(preds, variances, on_nonfinite="exclude")
    assert mean.tolist() == [1.0, 2.0]
    assert total.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("shape", [(10,), (4, 3)])
def test_gaussian_nll(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(10)
    mu, var, y = rng.normal(size=shape), rng.uniform(0.05, 3.0, size=shape), rng.normal(size=shape)
    expected = np.mean(0.5 * (np.log(2 * np.pi * var) + (y - mu) ** 2 / var))
    args = [torch.tensor(a) for a in (mu, var, y)]
    out = vm.gaussian_nll(*args)
    np.testing.assert_allclose(out.item(), expected, rtol=1e-12)
    torch_loss = torch.nn.functional.gaussian_nll_loss(args[0], args[2], args[1], full=True)
    np.testing.assert_allclose(out.item(), torch_loss.item(), rtol=1e-12)


def test_gaussian_nll_clamps_variance() -> None:
    out = vm.gaussian_nll(torch.zeros(1), torch.zeros(1), torch.zeros(1), eps=1e-4)
    assert_close(out, 0.5 * math.log(2 * math.pi * 1e-4))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: vm.regression_mean_variance(torch.zeros(3)),
            r"preds must have at least 2 dimensions .*\(3,\)",
        ),
        (
            lambda: vm.regression_mean_variance(torch.zeros(3, 2, dtype=torch.int32)),
            "floating-point",
        ),
        (
            lambda: vm.gaussian_mixture(torch.zeros(3, 2), torch.ones(3, 4)),
            r"means \(3, 2\), variances \(3, 4\)",
        ),
        (lambda: vm.gaussian_mixture(torch.zeros(3, 2), -torch.ones(3, 2)), "non-negative"),
        (lambda: vm.gaussian_nll(torch.zeros(3), torch.ones(3), torch.zeros(4)), r"target \(4,\)"),
        (
            lambda: vm.gaussian_nll(torch.zeros(3), -torch.ones(3), torch.zeros(3)),
            "var must be non-negative",
        ),
        (lambda: vm.gaussian_nll(torch.zeros(0), torch.ones(0), torch.zeros(0)), "empty"),
        (
            lambda: vm.gaussian_nll(torch.tensor([float("nan")]), torch.ones(1), torch.zeros(1)),
            "mean has NaN or inf",
        ),
        (lambda: vm.gaussian_nll(torch.zeros(1), torch.ones(1), torch.zeros(1), eps=0.0), "eps"),
    ],
)
def test_regression_input_errors(call: Callable[[], object], match: str) -> None:
    with pytest.raises(EnsembleError, match=match):
        call()


# ----------------------------------------------------------------------------- properties

logit_arrays = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(2, 6)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=st.floats(-30, 30, width=32))
)


@settings(max_examples=80, deadline=None)
@given(logits=logit_arrays)
def test_entropy_decomposition(logits: np.ndarray) -> None:
    x = torch.from_numpy(logits)
    total, aleatoric, epistemic = (
        vm.predictive_entropy(x),
        vm.expected_entropy(x),
        vm.mutual_information(x),
    )
    log_c = math.log(logits.shape[-1])
    assert (epistemic >= 0).all()
    assert (aleatoric >= 0).all()
    assert (total <= log_c + 1e-5).all()
    assert (aleatoric <= total + 1e-5).all()
    torch.testing.assert_close(total, aleatoric + epistemic, atol=1e-5, rtol=0)
    ratio = vm.variation_ratio(x)
    assert ((ratio >= 0) & (ratio <= 1 - 1 / logits.shape[-1] + 1e-6)).all()


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=40).filter(
        lambda d: 0 < sum(label for _, label in d) < len(d)
    )
)
def test_auroc_property(data: list[tuple[int, bool]]) -> None:
    scores = torch.tensor([float(s) for s, _ in data])
    labels = torch.tensor([label for _, label in data])
    value = vm.auroc(scores, labels).item()
    assert value == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)
    assert value + vm.auroc(-scores, labels).item() == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    probs=st.integers(1, 30).flatmap(
        lambda b: arrays(np.float64, (b, 3), elements=st.floats(0.01, 1.0))
    ),
    n_bins=st.integers(1, 20),
)
def test_calibration_errors_are_in_unit_interval(probs: np.ndarray, n_bins: int) -> None:
    p = torch.tensor(probs / probs.sum(-1, keepdims=True))
    t = torch.arange(len(probs)) % 3
    for fn in (vm.expected_calibration_error, vm.adaptive_calibration_error):
        value = fn(p, t, n_bins).item()
        assert 0.0 <= value <= 1.0


# ----------------------------------------------------------------------------- docs


def test_docstring_examples_run() -> None:
    result = doctest.testmod(vm, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_entropies_of_finite_but_extreme_logits(dtype):
    """log_softmax underflows to -inf for the losing class: 0 log 0 counts as 0, not NaN."""
    big = torch.finfo(dtype).max / 2
    logits = torch.tensor([[[big, -big]], [[-big, big]]], dtype=dtype)
    assert torch.equal(vm.expected_entropy(logits), torch.zeros(1, dtype=dtype))
    mi = vm.mutual_information(logits).float()
    torch.testing.assert_close(mi, torch.tensor([math.log(2)]), atol=1e-3, rtol=1e-3)
    log_p = torch.tensor([[float("nan"), 0.0], [-math.inf, 0.0]])  # NaN still propagates
    entropy = vm._entropy(log_p)
    assert entropy[0].isnan() and entropy[1] == 0


@pytest.mark.parametrize(("dtype", "n"), [(torch.bfloat16, 513), (torch.float16, 4097)])
def test_votes_are_counted_exactly_in_low_precision(dtype, n):
    # counted in the logits' dtype, 257 of 513 bfloat16 votes rounded to the share of 256:
    # a false tie that the tie-break (higher mean probability) gave to the minority
    logits = torch.zeros(n, 1, 2)
    logits[: n // 2 + 1, 0, 0] = 0.01  # a bare majority votes class 0
    logits[n // 2 + 1 :, 0, 1] = 5.0  # the rest vote class 1, confidently
    low = logits.to(dtype)
    assert vm.majority_vote(low).item() == 0
    minority = (n // 2) / n
    ratio = vm.variation_ratio(low)
    assert ratio.dtype == dtype
    assert ratio.item() == torch.tensor(minority).to(dtype).item()
    d = vm.disagreement(low)  # the mean favours class 1: the majority disagrees
    assert d.item() == torch.tensor((n // 2 + 1) / n).to(dtype).item()
