"""The tutorial's functorch API, unchanged, and the bugs of its recipe that vensemble avoids."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vensemble as ve
from _helpers import Tied
from vensemble import combine_state_for_ensemble, vmap

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_option_1_and_2_and_gradients():
    models = [
        nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(4)
    ]
    data = torch.randn(4, 5, 3, 4)
    fmodel, params, buffers = combine_state_for_ensemble(models)
    assert [p.size(0) for p in params] == [4, 4, 4, 4]
    assert not any(p.requires_grad for p in params)
    for p in params:
        p.requires_grad_()
    option1 = vmap(fmodel)(params, buffers, data)
    torch.testing.assert_close(
        option1, torch.stack([m(x) for m, x in zip(models, data)]), atol=1e-6, rtol=1e-5
    )
    option2 = vmap(fmodel, in_dims=(0, 0, None))(params, buffers, data[0])
    torch.testing.assert_close(
        option2, torch.stack([m(data[0]) for m in models]), atol=1e-6, rtol=1e-5
    )
    option2.pow(2).sum().backward()
    sum(m(data[0]).pow(2).sum() for m in models).backward()
    for p, name in zip(params, [n for n, _ in models[0].named_parameters()]):
        torch.testing.assert_close(
            p.grad, torch.stack([m.get_parameter(name).grad for m in models])
        )


def test_tied_weights_compute_with_the_given_weights():
    models = [Tied() for _ in range(3)]
    tokens = torch.randint(0, 11, (2, 4))
    fmodel, params, buffers = combine_state_for_ensemble(models)
    out = vmap(fmodel, in_dims=(0, 0, None))(params, buffers, tokens)
    torch.testing.assert_close(out, torch.stack([m(tokens) for m in models]), atol=1e-6, rtol=1e-5)


def test_batchnorm_buffers_and_the_architecture_check():
    models = [nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval() for _ in range(2)]
    fmodel, params, buffers = combine_state_for_ensemble(models)
    assert [b.shape[0] for b in buffers] == [2, 2, 2]
    x = torch.randn(4, 3)
    torch.testing.assert_close(
        vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x), torch.stack([m(x) for m in models])
    )
    with pytest.raises(ve.EnsembleError, match="is Tanh, member 0 has ReLU"):
        combine_state_for_ensemble([nn.Sequential(nn.ReLU()), nn.Sequential(nn.Tanh())])


def test_the_tutorial_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["model_ensembling.py", "--quick"])
    runpy.run_path(str(ROOT / "examples" / "model_ensembling.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "[10, 10, 10, 10, 10, 10]" in out
    assert "Predictions with vmap" in out and "Predictions with vensemble.Ensemble" in out
