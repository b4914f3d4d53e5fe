"""Member validation and the architecture fingerprint: refuse what torch.func silently stacks."""

from __future__ import annotations

import copy
import itertools

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import Tensor, nn

import vensemble as ve


def mlp(hidden: int = 8, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), act(), nn.Linear(hidden, 2))


class Scaled(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


class OtherMLP(nn.Sequential):
    pass


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ([], "at least one member"),
        ([mlp(), "not a module"], "member 1 is a str, expected an nn.Module"),
        (
            [mlp(), OtherMLP(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))],
            "member 1 is a OtherMLP but member 0 is a Sequential",
        ),
        (
            [mlp(), mlp(), mlp(hidden=16)],
            r"member 2 parameter '0.weight' has shape \(16, 4\), member 0 has \(8, 4\)",
        ),
        ([mlp(), mlp(act=nn.Tanh)], "member 1's module '1' is Tanh, member 0 has ReLU"),
        ([mlp(), nn.Sequential(nn.Linear(4, 8), nn.ReLU())], r"module tree.*missing \['2'\]"),
        (
            [Scaled(1.0), Scaled(100.0)],
            "member 1's root module attribute 'scale' is 100.0, member 0 has 1.0",
        ),
        (
            [nn.Dropout(0.1), nn.Dropout(0.5)],
            "member 1's root module .Dropout. is configured 'p=0.5, inplace=False', member 0 'p=0.1, inplace=False'",
        ),
        (
            [mlp(), mlp().double()],
            "member 1 parameter '0.weight' has dtype torch.float64, member 0 has torch.float32",
        ),
        (
            [mlp(), mlp().eval()],
            "member 1's root module is in eval mode, member 0's is in train mode",
        ),
        (
            [nn.LazyLinear(2), nn.LazyLinear(2)],
            "member 0 has an uninitialised lazy parameter or buffer 'weight'",
        ),
    ],
    ids=[
        "empty",
        "not-a-module",
        "other-class",
        "param-shape",
        "relu-vs-tanh",
        "module-tree",
        "python-attribute",
        "extra-repr",
        "dtype",
        "train-eval",
        "lazy",
    ],
)
def test_bad_members_raise_an_error_naming_the_culprit(models, match):
    with pytest.raises(ve.EnsembleError, match=match):
        ve.Ensemble(models)


def test_the_same_object_twice_is_refused():
    m = mlp()
    with pytest.raises(ve.EnsembleError, match="member 2 is the same module object as member 0"):
        ve.Ensemble([m, mlp(), m])


def test_members_sharing_a_parameter_are_refused():
    a, b = mlp(), mlp()
    b[0].weight = a[0].weight
    with pytest.raises(
        ve.EnsembleError, match=r"member 1 '0.weight' shares its memory with member 0 '0.weight'"
    ):
        ve.Ensemble([a, b])


def test_members_on_different_devices_are_refused():
    a, b = mlp(), mlp().to("meta")
    with pytest.raises(
        ve.EnsembleError, match=r"member 1 '0.weight' is on device meta, member 0's is on cpu"
    ):
        ve.Ensemble([a, b])


def test_different_weight_tying_is_refused():
    a, b = (
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
    )
    b[1].weight = b[0].weight
    with pytest.raises(
        ve.EnsembleError, match=r"member 1 has a different set of parameters|ties its weights"
    ):
        ve.Ensemble([a, b])


def test_functions_stored_as_attributes_are_part_of_the_fingerprint():
    class Act(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn
            self.fc = nn.Linear(2, 2)

    with pytest.raises(
        ve.EnsembleError, match=r"attribute 'fn' is torch.*tanh, member 0 has torch.*relu"
    ):
        ve.Ensemble([Act(torch.relu), Act(torch.tanh)])


def test_fingerprint_ignores_weights_and_is_json_ready():
    import json

    a, b = mlp(), mlp()
    assert ve.fingerprint(a) == ve.fingerprint(b)
    assert json.loads(json.dumps(ve.fingerprint(a))) == ve.fingerprint(a)
    assert ve.fingerprint(a) != ve.fingerprint(mlp(act=nn.GELU))


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    n=st.integers(1, 6),
    bias=st.booleans(),
)
def test_stack_then_unstack_gives_back_the_members(widths, n, bias):
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
        return nn.Sequential(*layers)

    members = [make() for _ in range(n)]
    snapshot = copy.deepcopy(members)
    ens = ve.Ensemble(members)
    back = ens.unstack()
    assert len(back) == n
    for original, recovered, source in zip(snapshot, back, members):
        assert type(recovered) is type(original)
        assert ve.fingerprint(recovered) == ve.fingerprint(original)
        for (k, v), (k2, v2) in zip(original.state_dict().items(), recovered.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
        for (_, v), (_, s) in zip(original.state_dict().items(), source.state_dict().items()):
            assert torch.equal(v, s)  # the sources were not changed
    x = torch.randn(3, widths[0])
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in snapshot]), atol=1e-6, rtol=1e-5)
