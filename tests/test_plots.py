"""Tests for vensemble.plots: figures built without pyplot, with the expected bars and points."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import vensemble.plots as vp
from vensemble import metrics as vm
from vensemble._errors import EnsembleError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_saves_png(fig: Figure, path: Path) -> None:
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def sample_probs(b: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(b, c, generator=gen).mul(2).softmax(-1)
    targets = torch.randint(0, c, (b,), generator=gen)
    return probs, targets


@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_reliability_diagram(n_bins: int, tmp_path: Path) -> None:
    probs, targets = sample_probs(100, 4, seed=n_bins)
    fig = vp.reliability_diagram(probs, targets, n_bins=n_bins)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    heights = [bar.get_height() for bar in ax.patches]
    assert len(heights) == n_bins
    _, accuracy, _ = vm.calibration_bins(probs, targets, n_bins)
    np.testing.assert_allclose(heights, accuracy.numpy(), rtol=1e-6)
    ece = vm.expected_calibration_error(probs, targets, n_bins).item()
    assert f"{ece:.3f}" in ax.get_title()
    assert_saves_png(fig, tmp_path / "reliability.png")


@pytest.mark.parametrize("n", [1, 3, 7])
def test_disagreement_histogram(n: int, tmp_path: Path) -> None:
    logits = torch.randn(n, 50, 3, generator=torch.Generator().manual_seed(n))
    fig = vp.disagreement_histogram(logits)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    heights = [bar.get_height() for bar in ax.patches]
    assert len(heights) == n + 1
    assert sum(heights) == 50
    # reference: count the members that disagree with the mean-probability argmax
    prediction = logits.softmax(-1).mean(0).argmax(-1)
    disagreeing = (logits.argmax(-1) != prediction).sum(0)
    assert heights == torch.bincount(disagreeing, minlength=n + 1).tolist()
    assert_saves_png(fig, tmp_path / "disagreement.png")


@pytest.mark.parametrize(("b", "n_bins", "points"), [(100, 10, 10), (4, 10, 4), (9, 3, 3)])
def test_uncertainty_vs_error(b: int, n_bins: int, points: int, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(b)
    uncertainty = torch.rand(b, generator=gen)
    is_error = torch.rand(b, generator=gen) < uncertainty
    is_error[:2] = torch.tensor([True, False])  # both outcomes occur
    fig = vp.uncertainty_vs_error(uncertainty, is_error, n_bins=n_bins)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    (line,) = ax.lines
    xs, ys = line.get_xdata(), line.get_ydata()
    assert len(xs) == len(ys) == points
    u, e = uncertainty.double().numpy(), is_error.numpy().astype(np.float64)
    groups = [g for g in np.array_split(np.argsort(u, kind="stable"), n_bins) if len(g)]
    np.testing.assert_allclose(xs, [u[g].mean() for g in groups], rtol=1e-12)
    np.testing.assert_allclose(ys, [e[g].mean() for g in groups], rtol=1e-12)
    assert "AUROC" in ax.get_title()
    assert_saves_png(fig, tmp_path / "uncertainty.png")


def test_uncertainty_vs_error_without_errors_has_no_auroc() -> None:
    fig = vp.uncertainty_vs_error(torch.rand(8), torch.zeros(8, dtype=torch.bool), n_bins=4)
    assert "AUROC" not in fig.axes[0].get_title()
    assert len(fig.axes[0].lines[0].get_xdata()) == 4


@pytest.mark.parametrize(
    ("uncertainty", "is_error", "n_bins", "match"),
    [
        (torch.rand(5), torch.zeros(4), 3, r"uncertainty \(5,\), is_error \(4,\)"),
        (torch.rand(0), torch.zeros(0), 3, "non-empty"),
        (torch.rand(4, 1), torch.zeros(4, 1), 3, r"got \(4, 1\)"),
        (torch.rand(4), torch.tensor([0, 1, 2, 0]), 3, "bool or 0/1"),
        (torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]), 3, "finite"),
        (torch.rand(4), torch.zeros(4), 0, "n_bins"),
    ],
)
def test_uncertainty_vs_error_errors(
    uncertainty: torch.Tensor, is_error: torch.Tensor, n_bins: int, match: str
) -> None:
    with pytest.raises(EnsembleError, match=match):
        vp.uncertainty_vs_error(uncertainty, is_error, n_bins=n_bins)


def test_plot_input_errors_are_ensemble_errors() -> None:
    with pytest.raises(EnsembleError, match="same batch size"):
        vp.reliability_diagram(torch.full((3, 2), 0.5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(EnsembleError, match=r"logits must have 3 dimensions"):
        vp.disagreement_histogram(torch.zeros(3, 2))


def test_missing_matplotlib_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    probs, targets = sample_probs(10, 3, seed=0)
    with pytest.raises(ImportError, match=r"pip install 'vensemble\[plot\]'"):
        vp.reliability_diagram(probs, targets)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(vp, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
