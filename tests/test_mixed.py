"""MixedEnsemble: several architectures, outputs in the original member order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vensemble as ve


def _wide() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def _deep() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _models() -> list[nn.Module]:
    return [_wide(), _deep(), nn.Linear(4, 3), _deep(), _wide(), _wide()]


@pytest.mark.parametrize("per_member", [False, True])
def test_outputs_and_gradients_follow_the_original_order(per_member):
    members = _models()
    sources = copy.deepcopy(members)
    mixed = ve.MixedEnsemble(members)
    assert [len(g) for g in mixed.groups] == [3, 2, 1] and len(mixed) == 6
    if per_member:
        xs = torch.randn(6, 5, 4)
        out = mixed(xs, in_dims=0)
        expected = torch.stack([m(x) for m, x in zip(sources, xs)])
    else:
        x = torch.randn(5, 4)
        out = mixed(x)
        expected = torch.stack([m(x) for m in sources])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    grad = mixed.groups[1].get_parameter("0.weight").grad  # the "deep" members 1 and 3
    torch.testing.assert_close(
        grad, torch.stack([sources[1][0].weight.grad, sources[3][0].weight.grad])
    )
    for i, m in enumerate(mixed.unstack()):
        assert ve.fingerprint(m) == ve.fingerprint(sources[i])


def test_outputs_of_different_shapes_are_refused():
    mixed = ve.MixedEnsemble([nn.Linear(4, 3), nn.Linear(4, 2)])
    with pytest.raises(ve.EnsembleError, match="different shapes"):
        mixed(torch.randn(5, 4))


def test_bad_inputs():
    with pytest.raises(ve.EnsembleError, match="at least one member"):
        ve.MixedEnsemble([])
    with pytest.raises(ve.EnsembleError, match="member index 5 is out of range"):
        ve.MixedEnsemble([nn.Linear(2, 2)]).member(5)


def test_member_errors_name_the_members_original_index():
    """Each architecture's group numbers its members from 0: errors name them as given."""
    with pytest.raises(ve.EnsembleError, match=r"member 2's root module is in eval mode"):
        ve.MixedEnsemble([nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(4, 3).eval()])
    shared = nn.Linear(4, 3)
    with pytest.raises(ve.EnsembleError, match=r"member 2 is the same module object as member 0"):
        ve.MixedEnsemble([shared, nn.Linear(4, 2), shared])
    with pytest.raises(
        ve.EnsembleError, match=r"member 1 '0.weight' shares its memory with member 0"
    ):
        ve.MixedEnsemble([shared, nn.Sequential(shared, nn.ReLU())])  # across groups


class _Tempered(nn.Module):
    """A classifier with a plain setting on its root (annealed during training)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))
        self.temperature = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) / self.temperature


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_a_root_setting_is_every_members_that_has_it(backend):
    """As on an Ensemble: mixed.temperature reads, sets and deletes the members' setting, in
    every architecture group that has it; groups that disagree are named on reading."""
    torch.manual_seed(0)
    members = [_Tempered(8), _Tempered(16), nn.Linear(4, 3), _Tempered(8)]
    mixed = ve.MixedEnsemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    torch.testing.assert_close(mixed(x), torch.stack([m(x) for m in members]))
    assert mixed.temperature == 1.0 and "temperature" in dir(mixed)
    mixed.temperature = 0.5  # the linear member has none: it is left alone
    for m in members[:2] + members[3:]:
        m.temperature = 0.5
    assert [g.temperature for g in mixed.groups if hasattr(g, "temperature")] == [0.5, 0.5]
    assert "temperature" not in mixed.__dict__
    assert not hasattr(mixed.groups[2], "temperature")
    torch.testing.assert_close(mixed(x), torch.stack([m(x) for m in members]))
    mixed.groups[1].temperature = 2.0
    with pytest.raises(AttributeError, match=r"groups \[0, 1\] hold different values.*2\.0"):
        _ = mixed.temperature
    del mixed.temperature
    assert not hasattr(mixed, "temperature")
    assert not any(hasattr(m, "temperature") for m in mixed.unstack())
    mixed.temperature = 4.0  # set again: the members' once more
    assert [m.temperature for m in mixed.unstack() if hasattr(m, "temperature")] == [4.0] * 3
    for group in mixed.groups[:2]:  # equal values, as separate objects
        group.temperature = float("nan")  # (NaN != NaN)
    assert mixed.temperature != mixed.temperature
    for group in mixed.groups[:2]:
        group.temperature = torch.tensor([0.5, 2.0])  # (== of tensors is no answer)
    assert torch.equal(mixed.temperature, torch.tensor([0.5, 2.0]))
    mixed.note = "mine"  # a name no member has: the mixed ensemble's own
    assert mixed.__dict__["note"] == "mine"
    assert not any(hasattr(g, "note") for g in mixed.groups)
