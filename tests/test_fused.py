"""The fused backend, layer by layer and op by op, against the loop: forward and backward."""

from __future__ import annotations

import copy
import dataclasses
import time
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble.backends import fused as fused_module

N = 3


def _call_without_fallback(ens: ve.Ensemble, *args: Tensor) -> Tensor:
    """``ens(*args)``, failing on any warning: the fused program ran, nothing fell back."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ens(*args)


def _layer_cases() -> list:
    c = pytest.param
    return [
        c(lambda: nn.Linear(5, 4), lambda: torch.randn(6, 5), id="linear"),
        c(lambda: nn.Linear(5, 4, bias=False), lambda: torch.randn(2, 3, 5), id="linear-3d-nobias"),
        c(lambda: nn.Linear(5, 4), lambda: torch.randn(5), id="linear-1d"),
        c(lambda: nn.Linear(5, 4), lambda: torch.randn(2, 3, 2, 5), id="linear-4d"),
        c(lambda: nn.Linear(5, 1), lambda: torch.randn(6, 5), id="linear-one-output"),
        c(lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 7), id="conv1d"),
        c(lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), lambda: torch.randn(2, 4, 7, 7), id="conv2d-groups"),
        c(lambda: nn.Conv2d(3, 4, 3, padding="same", bias=False), lambda: torch.randn(2, 3, 5, 5), id="conv2d-same"),
        c(lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(2, 3, 5, 5), id="conv2d-reflect"),
        c(lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(3, 6, 6), id="conv2d-unbatched-input"),
        c(lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(2, 2, 3, 4, 4), id="conv3d"),
        c(lambda: nn.BatchNorm1d(4), lambda: torch.randn(6, 4), id="bn1d"),
        c(lambda: nn.BatchNorm1d(4, momentum=None), lambda: torch.randn(6, 4, 5), id="bn1d-cumulative"),
        c(lambda: nn.BatchNorm2d(3, affine=False), lambda: torch.randn(4, 3, 5, 5), id="bn2d-noaffine"),
        c(lambda: nn.BatchNorm2d(3, track_running_stats=False), lambda: torch.randn(4, 3, 5, 5), id="bn2d-nostats"),
        c(lambda: nn.BatchNorm3d(2), lambda: torch.randn(3, 2, 3, 3, 3), id="bn3d"),
        c(lambda: nn.LayerNorm(5), lambda: torch.randn(4, 5), id="layernorm"),
        c(lambda: nn.LayerNorm((3, 5), bias=False), lambda: torch.randn(2, 3, 5), id="layernorm-2d-nobias"),
        c(lambda: nn.GroupNorm(2, 4), lambda: torch.randn(3, 4, 5), id="groupnorm"),
        c(lambda: nn.Embedding(7, 4), lambda: torch.randint(0, 7, (3, 5)), id="embedding"),
        c(lambda: nn.Embedding(7, 4, padding_idx=0), lambda: torch.tensor([[0, 1, 2], [3, 0, 6]]), id="embedding-padding"),
        c(lambda: nn.PReLU(), lambda: torch.randn(4, 3), id="prelu"),
        c(lambda: nn.PReLU(3), lambda: torch.randn(4, 3, 5), id="prelu-channels"),
        c(lambda: nn.Sequential(nn.Linear(5, 5), nn.GELU(approximate="tanh"), nn.SiLU(), nn.LeakyReLU(0.2)), lambda: torch.randn(4, 5), id="activations"),
        c(lambda: nn.Sequential(nn.Linear(5, 5), nn.Softmax(dim=1)), lambda: torch.randn(4, 5), id="softmax"),
        c(lambda: nn.Sequential(nn.Linear(5, 5), nn.LogSoftmax(dim=-1)), lambda: torch.randn(4, 5), id="log-softmax"),
        c(lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 2)), lambda: torch.randn(4, 2, 5, 5), id="flatten"),
        c(lambda: nn.Sequential(nn.Linear(6, 6), nn.Unflatten(1, (2, 3))), lambda: torch.randn(4, 6), id="unflatten"),
        c(lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), lambda: torch.randn(4, 3, 4), id="flatten-first"),
        c(lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.MaxPool2d(2)), lambda: torch.randn(2, 2, 6, 6), id="maxpool2d"),
        c(lambda: nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU()), lambda: torch.randn(4, 2, 5, 5), id="conv-bn-relu"),
        c(lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.AvgPool1d(2)), lambda: torch.randn(2, 2, 8), id="avgpool1d"),
        c(lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)), lambda: torch.randn(2, 2, 6, 6), id="adaptive-pool"),
    ]  # fmt: skip


def _members(factory: Callable[[], nn.Module], dtype: torch.dtype) -> list[nn.Module]:
    out = []
    for i in range(N):
        torch.manual_seed(10 + i)
        m = factory().to(dtype)
        with torch.no_grad():  # distinct, non-trivial affine params and running stats
            for name, p in m.named_parameters():
                if (name.endswith("weight") and p.ndim == 1) or "bias" in name:
                    p.add_(torch.randn_like(p) * 0.3)
            for name, b in m.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn_like(b) * 0.2)
                elif name.endswith("running_var"):
                    b.copy_(torch.rand_like(b) + 0.5)
        out.append(m)
    return out


def _grads(module: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad for k, p in module.named_parameters()}


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("factory", "make_input"), _layer_cases())
def test_fused_layer_equals_the_loop(factory, make_input, train, per_member):
    dtype = torch.float64
    members = [m.train(train) for m in _members(factory, dtype)]
    sources = copy.deepcopy(members)
    ens = ve.Ensemble(members, backend="fused")
    x = make_input()
    x = x.to(dtype) if x.is_floating_point() else x
    xs = torch.stack([make_input() for _ in range(N)]) if per_member else None
    if xs is not None:
        xs = xs.to(dtype) if xs.is_floating_point() else xs
        xs.requires_grad_(xs.is_floating_point())
        out = ens(xs, in_dims=0)
        ref_in = xs.detach().clone().requires_grad_(xs.is_floating_point())
        expected = torch.stack([m(ref_in[i]) for i, m in enumerate(sources)])
    else:
        x.requires_grad_(x.is_floating_point())
        out = ens(x)
        ref_in = x.detach().clone().requires_grad_(x.is_floating_point())
        expected = torch.stack([m(ref_in) for m in sources])
    routes = ens.explain()
    assert "(fused)" not in routes and any(v.startswith("fused") for v in routes.values()), routes
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-8)
    weights = torch.randn(out.shape, dtype=dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for key, g in _grads(ens).items():
        want = torch.stack([_grads(s)[key] for s in sources])
        torch.testing.assert_close(g, want, atol=1e-10, rtol=1e-8, msg=f"grad {key}")
    if ref_in.requires_grad:
        got_in = (xs if xs is not None else x).grad
        torch.testing.assert_close(got_in, ref_in.grad, atol=1e-10, rtol=1e-8, msg="input grad")
    for key, b in ens.named_buffers():
        want = torch.stack([s.get_buffer(key) for s in sources])
        torch.testing.assert_close(b, want, atol=1e-10, rtol=1e-8, msg=f"buffer {key}")


class _Ops(nn.Module):
    """A forward full of tensor functions and methods that must see the member's shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 3)
        self.register_buffer("offset", torch.linspace(-1, 1, 8))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor, extra: Tensor) -> Tensor:
        h = torch.relu(self.a(x))  # (B, T, 8)
        b, t = h.shape[0], h.size(1)
        h = h + self.offset * self.scale  # a per-member buffer and a scalar parameter
        h = h.view(b, t, 2, 4).transpose(1, 2).reshape(b, 2 * t, 4)  # (B, 2T, 4)
        first, second = h.chunk(2, dim=1)  # 2 x (B, T, 4)
        h = torch.cat([first, second, extra], dim=-1)[..., :4]  # shared `extra` joins
        pooled = h.mean(dim=1) + h.amax(1) - h.permute(0, 2, 1).sum(-1) / h.dim()
        last = self.b(h[:, -1]) + torch.matmul(h[:, 0].unsqueeze(1), h[:, 1].unsqueeze(-1)).squeeze(
            -1
        )
        top = torch.softmax(last, dim=-1).max(dim=1).values
        return F.gelu(self.b(pooled)) * top.unsqueeze(1) + torch.stack([last, last], dim=0).sum(0)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_tensor_functions_and_methods_see_the_members_shapes(per_member):
    members = _members(_Ops, torch.float64)
    sources = copy.deepcopy(members)
    ens = ve.Ensemble(members, backend="fused")
    extra = torch.randn(2, 5, 3, dtype=torch.float64)
    if per_member:
        xs = torch.randn(N, 2, 5, 6, dtype=torch.float64)
        out = ens(xs, extra, in_dims=(0, None))
        expected = torch.stack([m(xs[i], extra) for i, m in enumerate(sources)])
    else:
        x = torch.randn(2, 5, 6, dtype=torch.float64)
        out = ens(x, extra)
        expected = torch.stack([m(x, extra) for m in sources])
    routes = ens.explain()
    assert "(fused)" not in routes, routes
    assert routes["a"].startswith("fused") and any(
        k.startswith("matmul") and v == "vmap" for k, v in routes.items()
    ), routes
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-8)
    out.sum().backward()
    expected.sum().backward()
    for key, g in _grads(ens).items():
        torch.testing.assert_close(
            g, torch.stack([_grads(s)[key] for s in sources]), atol=1e-10, rtol=1e-8, msg=key
        )


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 16)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(self.fc(x), 0.5, self.training)
        return h + torch.randn_like(h) * 0.1


def _identical(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return make


def test_dropout_in_eval_mode_is_the_identity():
    members = [
        nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5), nn.Identity()).eval() for _ in range(N)
    ]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(4, 5)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]), atol=1e-6, rtol=1e-5)
    assert ens.explain()["1"].startswith("fused")


def test_random_ops_draw_per_member_and_repeat_under_a_seed():
    ens = ve.Ensemble.from_factory(_identical(_Noisy), 4, backend="fused")
    x = torch.randn(5, 4)
    torch.manual_seed(3)
    a = ens(x)
    torch.manual_seed(3)
    b = ens(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(not torch.allclose(a[0], a[i]) for i in range(1, 4))
    assert "(fused)" not in ens.explain()


class _FreshNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + torch.rand(4)  # no traced input: fx would freeze this draw


def test_random_factories_without_inputs_are_not_frozen():
    ens = ve.Ensemble.from_factory(_identical(_FreshNoise), 3, backend="fused")
    x = torch.randn(2, 4)
    first = ens(x)
    second = ens(x)
    assert "torch.rand" in ens.explain()["(fused)"]
    assert not torch.allclose(first, second) and not torch.allclose(first[0], first[1])


_DRAWS_FROM_CONSTANTS = {
    "normal_": lambda: torch.empty(4).normal_(),
    "uniform_": lambda: torch.zeros(4).uniform_(),
    "bernoulli": lambda: torch.full((4,), 0.5).bernoulli(),
    "rand_like": lambda: torch.rand_like(torch.zeros(4)),
    "distributions": lambda: torch.distributions.Normal(torch.zeros(4), torch.ones(4)).rsample(),
    "init": lambda: nn.init.trunc_normal_(torch.empty(4)),
}


class _ConstantNoise(nn.Module):
    def __init__(self, draw: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.draw = draw

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + _DRAWS_FROM_CONSTANTS[self.draw]()


@pytest.mark.parametrize("backend", ["fused", "auto"])
@pytest.mark.parametrize("draw", sorted(_DRAWS_FROM_CONSTANTS))
def test_draws_into_tensors_made_from_constants_are_not_frozen(backend, draw):
    """A draw into a tensor the forward made from constants alone (torch.distributions and
    nn.init draw so) ran once, at trace time, and fx froze it into the program: the same
    noise for every member and every call. It runs as the loop's: anew, per member (under
    vmap, or per member where vmap refuses a draw in place into a shared tensor)."""
    ens = ve.Ensemble.from_factory(_identical(lambda: _ConstantNoise(draw)), 3, backend=backend)
    x = torch.randn(2, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ve.FallbackWarning)
        clean = torch.stack([ens.member(i).fc(x) for i in range(3)])
        first, second = ens(x) - clean, ens(x) - clean
    if backend == "fused":  # (nn.init's draw comes in a no_grad block, refused first)
        assert ens.explain()["(fused)"].startswith("not used: the forward ")
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[1], first[2])
    assert not torch.allclose(first, second)
    torch.manual_seed(3)
    again = ens(x)
    torch.manual_seed(3)
    torch.testing.assert_close(ens(x), again)  # a seed gives the same draws


class _DrawsIntoFresh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        noise = x.new_empty(x.shape).normal_()  # made the same for every member, drawn into
        t = torch.empty_like(x)
        t.uniform_(-1, 1)  # (read after: its draws)
        return self.fc(x) + 0.1 * noise + t


def test_draws_into_a_tensor_made_for_all_are_each_members_own():
    """randomness='different': an in-place draw into a shared tensor the forward made went to
    vmap, which refuses it, then to the loop, with two warnings. It is copied per member and
    drawn into: fused, each member's draws its own, anew on every call, a seed repeating them."""
    ens = ve.Ensemble.from_factory(_identical(_DrawsIntoFresh), 3, backend="fused")
    x = torch.randn(2, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        clean = torch.stack([ens.member(i).fc(x) for i in range(3)])
        first, second = ens(x) - clean, ens(x) - clean
        torch.manual_seed(7)
        again = ens(x)
        torch.manual_seed(7)
        torch.testing.assert_close(ens(x), again, atol=0, rtol=0)
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first, second)
    assert ens.explain()["normal_ (normal_)"].endswith("copied per member, then drawn into")


def test_randomness_same_gives_identical_members_identical_draws():
    ens = ve.Ensemble.from_factory(_identical(_Noisy), 3, backend="fused", randomness="same")
    out = ens(torch.randn(5, 4))
    torch.testing.assert_close(out[0], out[2], atol=0, rtol=0)


class _DropBothSides(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(0.5)  # on the shared input
        self.fc = nn.Linear(4, 4)
        self.drop_out = nn.Dropout(0.3)  # on per-member activations

    def forward(self, x: Tensor) -> Tensor:
        return self.drop_out(self.fc(self.drop_in(x)))


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_dropout_modules_with_randomness_same_draw_one_mask_for_all(backend):
    """randomness='same': one mask for every member, on a shared input (it went to vmap,
    which had no member dim to map, then to the loop, with a warning) and on per-member
    activations; identical members give identical outputs, and each call draws anew."""
    ens = ve.Ensemble.from_factory(
        _identical(_DropBothSides), 3, backend=backend, randomness="same"
    )
    x = torch.randn(6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        first, second = ens(x), ens(x)
    for out in (first, second):
        torch.testing.assert_close(out[0], out[1], atol=0, rtol=0)
        torch.testing.assert_close(out[0], out[2], atol=0, rtol=0)
        assert (out == 0).any()  # (dropped)
    assert not torch.equal(first, second)
    if backend == "fused":
        assert "the same for every member" in ens.explain()["drop_in"]


@pytest.mark.parametrize("backend", ["fused", "auto", "vmap"])
def test_randomness_error_raises_on_random_ops_like_vmap(backend):
    ens = ve.Ensemble.from_factory(_Noisy, 2, backend=backend, randomness="error")
    with pytest.raises(RuntimeError, match="randomness"):
        ens(torch.randn(5, 4))
    quiet = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout()), 2, backend=backend, randomness="error"
    )
    quiet.eval()  # dropout draws nothing in eval mode: no error
    assert quiet(torch.randn(5, 4)).shape == (2, 5, 4)


def test_dropout_module_on_a_shared_input_draws_per_member():
    ens = ve.Ensemble.from_factory(
        _identical(lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8))), 3, backend="fused"
    )
    out = ens(torch.randn(4, 8))
    assert not torch.allclose(out[0], out[1])


def test_out_major_linear_picks_a_shared_input_kernel_and_both_kernels_agree():
    from vensemble.backends import _autotune

    ens = ve.Ensemble.from_factory(lambda: nn.Linear(7, 5), 4, backend="fused").double()
    ens.weight.data = ens.weight.data.contiguous()  # the member's own layout (as when tied)
    x = torch.randn(9, 7, dtype=torch.float64)
    expected = torch.stack([m(x) for m in ens.unstack()])
    torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)
    chosen = [v for k, v in _autotune.choices().items() if k[0] == "linear-shared" and k[2] == 9]
    assert chosen and chosen[0] in ("wide", "bmm")
    for forced in ("wide", "bmm"):
        for k in list(_autotune._CACHE):
            if k[0] == "linear-shared":
                _autotune._CACHE[k] = forced
        torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)


class _NarrowChain(nn.Module):
    """Narrow layers in a row (the second reads the first's output in either orientation)."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5, bias=bias)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(3, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(7, 6), (2, 4, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_narrow_linear_layers_equal_the_members_in_either_orientation(
    monkeypatch, columns, bias, shape, per_member
):
    from vensemble.backends._layers import _Linear

    monkeypatch.setattr(_Linear, "_in_columns", lambda self, x3, wt, bu: columns)
    torch.manual_seed(0)
    members = [_NarrowChain(bias).double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(N, *shape, dtype=torch.float64) if per_member else torch.randn(*shape).double()
    expected = torch.stack([m(x[i] if per_member else x) for i, m in enumerate(members)])
    with torch.no_grad():  # the program without autograd, whose narrow layers may go by columns
        out = ens(x, in_dims=0 if per_member else None)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    ens.requires_grad_(False)  # grad mode on, but autograd records nothing: the same choice
    out = ens(x, in_dims=0 if per_member else None)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_a_narrow_linear_that_autograd_records_runs_by_rows(monkeypatch):
    from vensemble.backends._layers import _Linear

    asked = []
    monkeypatch.setattr(_Linear, "_in_columns", lambda *args: asked.append(args) or False)
    torch.manual_seed(0)
    members = [_NarrowChain(True).double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(7, 6, dtype=torch.float64)
    _assert_outputs_and_gradients_equal_the_members(ens, members, ens(x), x)
    assert not asked
    with torch.no_grad():
        ens(x)  # without autograd it is asked, for each of the three layers
    assert len(asked) == 3


def test_a_narrow_linear_measures_its_orientation_once_and_says_which():
    from vensemble.backends import _autotune
    from vensemble.backends._layers import NARROW_OUTPUTS

    ens = ve.Ensemble.from_factory(lambda: nn.Linear(32, 4), 5, backend="fused")
    x = torch.randn(40, 32)
    with torch.no_grad():
        ens(x)
    keys = [
        k
        for k in _autotune.choices()
        if k[0] == "linear-rows-or-columns" and k[5] == 40 and k[1:4] == (5, 32, 4)
    ]  # (the table is the process's: other tests' layers are in it too)
    assert len(keys) == 1
    chosen = _autotune.choices()[keys[0]]
    assert chosen in ("rows", "columns")
    assert ("y^T = W x^T for 40 rows" in ens.explain()["Linear"]) == (chosen == "columns")
    _autotune._CACHE[keys[0]] = "columns" if chosen == "rows" else "rows"
    with torch.no_grad():
        ens(x)  # the layer remembers its choice: the global table is not read again
    assert ("y^T = W x^T for 40 rows" in ens.explain()["Linear"]) == (chosen == "columns")
    wide = ve.Ensemble.from_factory(lambda: nn.Linear(32, NARROW_OUTPUTS + 1), 5, backend="fused")
    with torch.no_grad():
        wide(torch.randn(41, 32))
    assert not any(k[0] == "linear-rows-or-columns" and k[5] == 41 for k in _autotune.choices())


def test_a_narrow_linear_with_no_more_rows_than_outputs_is_not_measured(monkeypatch):
    from vensemble.backends._layers import _Linear

    asked = []
    monkeypatch.setattr(_Linear, "_in_columns", lambda *args: asked.append(args) or False)
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(16, 4), 3, backend="fused")
    with torch.no_grad():
        for rows in (1, 4):  # a batch of 1 (an RL actor's step), and as many rows as outputs
            ens(torch.randn(rows, 16))
        assert not asked
        ens(torch.randn(5, 16))
    assert len(asked) == 1


class _SeesItsLayout(nn.Module):
    """A narrow Linear whose output is then viewed, reshaped or asked for its layout: what the
    member does to it depends on its being contiguous."""

    def __init__(self, then: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(3, 2)
        self.then = then

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.then(torch.tanh(self.a(x))))


def _writes_through_a_view(h: Tensor) -> Tensor:
    h.view(-1)[::2].mul_(0)
    return h


def _writes_through_a_reshape(h: Tensor) -> Tensor:
    h.reshape(-1)[1::3].add_(2)
    return h


def _writes_through_flatten(h: Tensor) -> Tensor:
    h.flatten()[:4].fill_(1)
    return h


def _writes_through_a_view_of_another_shape(h: Tensor) -> Tensor:
    h.view(3, -1).add_(1)
    return h


def _writes_after_a_view(h: Tensor) -> Tensor:
    v = h.view(-1)
    h.mul_(3)
    return v.view(h.shape)


def _writes_through_contiguous(h: Tensor) -> Tensor:
    h.contiguous().mul_(0)  # the member's contiguous() is h itself
    return h


def _writes_after_contiguous(h: Tensor) -> Tensor:
    g = h.contiguous()
    h.add_(100)
    return g


def _asks_if_contiguous(h: Tensor) -> Tensor:
    return h * 2 if h.is_contiguous() else h


_LAYOUT_SEEN = [
    _writes_through_a_view,
    _writes_through_a_reshape,
    _writes_through_flatten,
    _writes_through_a_view_of_another_shape,
    _writes_after_a_view,
    _writes_through_contiguous,
    _writes_after_contiguous,
    _asks_if_contiguous,
]


@pytest.mark.parametrize("then", _LAYOUT_SEEN, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_narrow_linear_whose_layout_is_seen_gives_the_members_result_by_columns(
    monkeypatch, then, backend
):
    from vensemble.backends._layers import _Linear

    monkeypatch.setattr(_Linear, "_in_columns", lambda self, x3, wt, bu: True)  # where allowed
    torch.manual_seed(0)
    members = [_SeesItsLayout(then).double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        out = ens(x)
        torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


class _TiedThenViewed(nn.Module):
    """A tied weight is out-major: the batched Linear computes y^T = W x^T whatever its width."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(torch.relu(self.a(x)))
        h.view(-1)[:5].mul_(0)
        return h


class _ConvThenViewed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c(x)
        h.view(-1)[::3].mul_(0)
        return h


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_an_out_major_linear_whose_layout_is_seen_gives_the_members_result(grad):
    torch.manual_seed(0)
    members = [_TiedThenViewed().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(6, 8, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        expected = torch.stack([m(x) for m in members])
        torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)


# the first candidate (grouped or concatenated: a transposed view), or the last (the loop)
@pytest.mark.parametrize("kernel", [0, -1], ids=["grouped-or-concat", "loop"])
@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_a_conv_whose_layout_is_seen_gives_the_members_result_by_any_kernel(
    monkeypatch, per_member, kernel
):
    from vensemble.backends import _layers

    torch.manual_seed(0)
    members = [_ConvThenViewed().double() for _ in range(N)]
    x = torch.randn(N, 2, 3, 6, 6, dtype=torch.float64) if per_member else torch.randn(2, 3, 6, 6)
    x = x.double()
    with torch.no_grad():
        expected = torch.stack([m(x[i] if per_member else x) for i, m in enumerate(members)])
    monkeypatch.setattr(_layers, "autotune", lambda key, cands, device: list(cands)[kernel])
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    with torch.no_grad():
        out = ens(x, in_dims=0 if per_member else None)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


class _LayoutWritten(nn.Module):
    """A conv (and pooling) whose output the forward writes through a view or a copy of
    another shape: whether the write shows in the result depends on the output's layout
    (a channels-last output's reshape is a copy, a contiguous one's a view)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c = nn.Conv2d(3, 4, 3)
        self.d = nn.Conv2d(4, 4, 1)
        self.p = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "contiguous":
            h = self.c(x)
            h.contiguous().mul_(0)
        elif self.kind == "pool-reshape":
            h = self.p(torch.relu(self.c(x)))
            h.reshape(h.shape[0], -1).mul_(0)
        else:  # "chain-flatten": a conv reading another's output, then flattened
            h = self.d(torch.relu(self.c(x)))
            h.flatten(1)[:, ::2].mul_(0)
        return h


# the first candidate (grouped or concatenated), or the last (the loop)
@pytest.mark.parametrize("kernel", [0, -1], ids=["grouped-or-concat", "loop"])
@pytest.mark.parametrize("kind", ["contiguous", "pool-reshape", "chain-flatten"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last-input", "channels-last-weights"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_seen_conv_and_pooling_lay_out_their_result_as_the_loops_member(
    monkeypatch, kernel, kind, layout, dtype
):
    from vensemble.backends import _layers

    torch.manual_seed(0)
    members = [_LayoutWritten(kind).to(dtype) for _ in range(N)]
    if layout == "channels-last-weights":
        members = [m.to(memory_format=torch.channels_last) for m in members]
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    if layout == "channels-last-input":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = ve.Ensemble(copy.deepcopy(members), backend="loop")(x)
        own = torch.stack([m(x) for m in members])  # the loop runs each member as it runs alone
        torch.testing.assert_close(
            expected, own, atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0
        )
    monkeypatch.setattr(_layers, "autotune", lambda key, cands, device: list(cands)[kernel])
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = ens(x)
        torch.testing.assert_close(out, expected, atol=tol, rtol=0, msg=f"grad={grad}")
    programs = list(ens._fused.programs.values())  # (one per autograd mode)
    assert len(programs) == 2 and not any(isinstance(p, str) for p in programs), programs


class _PoolAtTwoSites(nn.Module):
    """One pooling module called twice: its first output reaches only the program's output
    (nothing can tell its layout), its second is written through a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.p = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.c(x)
        early = self.p(x) * 2
        h = self.p(h)
        h.reshape(h.shape[0], -1).mul_(0)  # shows in h only where the reshape is a view
        return early, h


def test_a_layer_called_at_two_sites_lays_out_each_sites_result_by_its_own_readers(monkeypatch):
    """Each call site runs its own wrapper, with its own ``layout_unseen``: the second site's
    seen result (written through a reshape) is laid out as the member's although the first
    site's is unseen, and so is the conv's that feeds it."""
    from vensemble.backends import _layers

    torch.manual_seed(0)  # channels-last weights: the member's results are channels-last
    members = [_PoolAtTwoSites().to(memory_format=torch.channels_last) for _ in range(N)]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = [torch.stack(o) for o in zip(*[m(x) for m in members])]
    monkeypatch.setattr(_layers, "autotune", lambda key, cands, device: next(iter(cands)))
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    with torch.no_grad():
        out = _call_without_fallback(ens, x)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["contiguous", "pool-reshape", "chain-flatten"])
def test_a_seen_conv_is_laid_out_as_the_members_under_deterministic_algorithms(kind):
    # nothing is timed there, but a layout is not a timing: it is still learned
    torch.manual_seed(0)
    members = [_LayoutWritten(kind).double() for _ in range(N)]
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            out = ens(x)
    finally:
        torch.use_deterministic_algorithms(before)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_a_seen_conv_under_compile_learns_each_new_shapes_layout():
    # a batch size first seen inside the compiled program (the last, partial batch) had its
    # conv and pooling results made contiguous where the loop's member lays them out
    # channels-last (the members' weights are)
    torch.manual_seed(0)
    members = [
        _LayoutWritten("pool-reshape").to(memory_format=torch.channels_last) for _ in range(N)
    ]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused", compile=True)
    loop = ve.Ensemble(copy.deepcopy(members), backend="loop")
    with torch.no_grad():
        for batch in (2, 5, 1):  # (a compiled batch of 1 has any stride on its size-1 dim)
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(ens(x), loop(x), atol=1e-5, rtol=0, msg=f"batch {batch}")


def test_a_jit_trace_keeps_the_layout_learned_before():
    torch.manual_seed(0)
    members = [_LayoutWritten("contiguous").double() for _ in range(N)]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)  # learned here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the tracer's own warnings)
            traced = torch.jit.trace(ens, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), expected, atol=1e-12, rtol=0)


class _ExpandsThenWrites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c(x.expand(-1, 3, -1, -1))  # one channel to three: stride 0
        h.contiguous().mul_(0)  # a view only if h is contiguous
        return h


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["expanded", "transposed"])
def test_a_batch_of_one_with_an_odd_layout_is_laid_out_as_the_members(kind, batch):
    # size-1 dims and stride-0 dims: torch's layout rules read their strides
    torch.manual_seed(0)
    if kind == "expanded":
        members = [_ExpandsThenWrites().double() for _ in range(N)]
        x = torch.randn(batch, 1, 8, 8, dtype=torch.float64)
    else:
        members = [_LayoutWritten("contiguous").double() for _ in range(N)]
        x = torch.randn(batch, 8, 8, 3, dtype=torch.float64).transpose(1, 3)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        out = ve.Ensemble(copy.deepcopy(members), backend="fused")(x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def _layout_flags(ens: ve.Ensemble) -> dict[str, bool]:
    from vensemble.backends._layers import Fused

    (program,) = ens._fused.programs.values()  # one call signature
    return {k: v.layout_unseen for k, v in program.parts.items() if isinstance(v, Fused)}


@pytest.mark.parametrize("flattened", [False, True])
def test_a_conv_feeding_pooling_keeps_its_kernels_layout_only_where_nothing_sees_it(
    monkeypatch, flattened
):
    from vensemble.backends import _layers

    def net() -> nn.Module:
        layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*layers, *([nn.Flatten()] if flattened else [])).double()

    monkeypatch.setattr(_layers, "autotune", lambda key, cands, device: next(iter(cands)))
    torch.manual_seed(0)
    members = [net().eval() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    for x in (
        torch.randn(2, 3, 8, 8),
        torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),
    ):
        x = x.double()
        with torch.no_grad():
            out = ens(x)
            expected = torch.stack([m(x) for m in members])
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    flags = _layout_flags(ens)
    # the flatten sees the pooling's layout, which follows the conv's: both lay out as the
    # member's; returned as they are, neither layout can be told
    assert (flags["0"], flags["3"]) == ((False, False) if flattened else (True, True))


class _NarrowHeadReadAround(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(torch.relu(self.a(x)))
        rows = h.size(0)  # a shape query
        return F.log_softmax(h, dim=-1) + h.mean(-1, keepdim=True) / rows  # reductions


def test_shape_queries_and_reductions_do_not_see_a_layout():
    torch.manual_seed(0)
    members = [_NarrowHeadReadAround().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(40, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]), atol=1e-12, rtol=0)
    assert _layout_flags(ens) == {"a": True, "head": True}


def test_columns_are_allowed_only_where_no_reader_sees_the_layout():
    from vensemble.backends._layers import _Linear

    def allowed(ens: ve.Ensemble, x: Tensor) -> dict[str, bool]:
        with torch.no_grad():
            ens(x)
        (program,) = ens._fused.programs.values()  # one call signature
        return {k: v.layout_unseen for k, v in program.parts.items() if isinstance(v, _Linear)}

    x = torch.randn(7, 6)
    chain = ve.Ensemble([_NarrowChain(True) for _ in range(N)], backend="fused")
    assert allowed(chain, x) == {"a": True, "b": True, "c": True}  # through tanh and relu
    for then in (_writes_through_a_view, _writes_after_a_view):
        seen = ve.Ensemble([_SeesItsLayout(then) for _ in range(N)], backend="fused")
        assert allowed(seen, x) == {"a": False, "b": True}  # b's output is the program's


def test_a_narrow_linear_under_deterministic_algorithms_takes_the_rows_kernel(monkeypatch):
    from vensemble.backends import _autotune

    def refuse(*args, **kwargs):
        raise AssertionError("measured under deterministic algorithms")

    monkeypatch.setattr("vensemble.backends._layers.autotune", refuse)
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(16, 2), 3, backend="fused").double()
    x = torch.randn(11, 16, dtype=torch.float64)
    expected = torch.stack([m(x) for m in ens.unstack()])
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = ens(x)
    finally:
        torch.use_deterministic_algorithms(before)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert "y^T" not in str(ens.explain())
    assert not any(k[0] == "linear-rows-or-columns" for k in _autotune.choices() if k[5] == 11)


def test_conv_kernels_all_agree():
    from vensemble.backends import _autotune

    ens = ve.Ensemble.from_factory(lambda: nn.Conv2d(3, 4, 3), 3, backend="fused").double()
    for batched in (False, True):
        x = (
            torch.randn(3, 2, 3, 6, 6, dtype=torch.float64)
            if batched
            else torch.randn(2, 3, 6, 6, dtype=torch.float64)
        )
        expected = torch.stack([m(x[i] if batched else x) for i, m in enumerate(ens.unstack())])
        ens(x, in_dims=0 if batched else None)
        keys = [k for k in _autotune._CACHE if k[0] == "conv" and k[1] == tuple(x.shape)]
        assert keys
        for forced in ("loop", "grouped" if batched else "concat"):
            _autotune._CACHE[keys[0]] = forced
            torch.testing.assert_close(
                ens(x, in_dims=0 if batched else None), expected, atol=1e-12, rtol=0
            )


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return y if y.sum() > 0 else -y  # data-dependent control flow: fx cannot trace it


def test_an_untraceable_forward_runs_under_vmap_and_explain_says_why():
    members = [_Untraceable() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(4, 3)
    with pytest.warns(ve.FallbackWarning, match="the model's forward"):
        out = ens(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    assert "not used" in ens.explain()["(fused)"]


def test_keyword_arguments_and_non_tensor_inputs_are_specialised_per_value():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: Tensor, scale: float = 1.0, mask: Tensor | None = None) -> Tensor:
            y = self.fc(x) * scale
            return y if mask is None else y * mask

    members = [Scaled() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x, mask = torch.randn(4, 3), torch.ones(4, 2) * 2
    for kwargs in ({}, {"scale": 3.0}, {"mask": mask}, {"scale": 0.5, "mask": mask}):
        torch.testing.assert_close(ens(x, **kwargs), torch.stack([m(x, **kwargs) for m in members]))
    assert len(ens._fused.programs) == 4


def test_compile_gives_the_same_answer_and_reports_its_warm_up():
    members = [nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), compile=True)
    x = torch.randn(8, 6)
    expected = torch.stack([m(x) for m in members])
    with torch.no_grad():
        for _ in range(3):  # eager (settles the kernels), compile + warm-up, compiled
            torch.testing.assert_close(ens(x), expected, atol=1e-5, rtol=1e-5)
    assert "warm-up" in ens.explain()["(compile)"]
    with pytest.raises(ve.EnsembleError, match="compile must be a bool or a dict"):
        ve.Ensemble(members, compile="yes")


class _ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.b1(self.c1(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_compile_runs_a_cnn_as_one_graph_for_each_batch_size():
    """Each layer's measured choices (kernel, result layout) are made by an eager call per
    new input signature, so the compiled program only reads them. Before, each conv broke the
    graph to measure, dynamo made every layer's shapes dynamic at the shared resume points,
    and inductor failed on a new batch size ("cannot determine truth value of Relational"):
    the call fell back to vmap."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    members = [_ResidualCNN() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused", compile=True)
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        # the first call under deterministic algorithms measures nothing: the next one, with
        # the same shapes, must still be settled eagerly before it is compiled
        for batch, deterministic in ((4, True), (4, False), (3, False), (4, False), (3, False)):
            x = torch.randn(batch, 3, 6, 6)
            torch.use_deterministic_algorithms(deterministic)
            try:
                out = ens(x)
            finally:
                torch.use_deterministic_algorithms(False)
            expected = torch.stack([m(x) for m in members])  # train mode: stats move alike
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0, msg=f"batch {batch}")
            out.sum().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert "warm-up" in ens.explain()["(compile)"]
    for name, t in ens.state_dict().items():  # running statistics updated as the members'
        torch.testing.assert_close(t, torch.stack([m.state_dict()[name] for m in members]))


class _WritesThroughReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c(x)
        y.reshape(y.shape[0], -1)[:, :7].mul_(0)  # writes y only where the reshape is a view
        return y


def test_compile_lays_out_a_conv_result_as_the_eager_call_learned_it():
    """An HWC image permuted to CHW and unsqueezed has strides (3, 1, 18, 3): torch's conv
    gives a contiguous result (the size-1 batch dim's stride rules channels-last out). The
    compiled program rebuilt the layout key from strides with size-1 dims normalised, which
    learned channels-last (0.06 off the loop) and broke the graph at every layer; it now reads
    what the eager call of the same input signature learned."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    members = [_WritesThroughReshape() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused", compile=True)
    counters.clear()
    with torch.no_grad():
        for _ in range(3):  # eager (settles), compiled (warm-up), compiled
            x = torch.randn(6, 6, 3).permute(2, 0, 1)[None]
            expected = torch.stack([m(x) for m in members])
            torch.testing.assert_close(_call_without_fallback(ens, x), expected, atol=1e-6, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


class _TwoConvsWritten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c(self.c1(x))
        y.reshape(y.shape[0], -1)[:, :7].mul_(0)  # writes y only where the reshape is a view
        return y


def test_compile_learns_again_when_the_weights_layout_changes():
    """A state dict loaded with assign=True (channels-last weights made contiguous) gave the
    compiled program the old layouts: 0.79 off the loop through a reshape write, and 0.73 for
    a conv whose own weights kept their layout but whose input, an upstream conv's result,
    changed it. Such a load forgets what was learned, however it was started."""
    torch.manual_seed(0)
    members = [_TwoConvsWritten() for _ in range(N)]
    for m in members:
        m.c1.to(memory_format=torch.channels_last)  # only the first conv
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused", compile=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)  # (torch's own warnings may come)
        for _ in range(3):
            expected = torch.stack([m(x) for m in ens.unstack()])
            torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=0)
        # through a model holding the ensemble: its own load_state_dict is not called
        holder = nn.ModuleDict({"ens": ens})
        state = {k: v.contiguous().clone() for k, v in holder.state_dict().items()}
        holder.load_state_dict(state, assign=True)
        for _ in range(2):
            expected = torch.stack([m(x) for m in ens.unstack()])
            assert ens.unstack()[0].c1.weight.is_contiguous()
            torch.testing.assert_close(ens(x), expected, atol=1e-6, rtol=0)


class _SlicesThenWrites(_WritesThroughReshape):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x[:, :3])  # a view of the input: its size-1 strides kept


@pytest.mark.parametrize("route", ["input", "a view of the input"])
@pytest.mark.parametrize("ours", [False, True], ids=["compile=False", "compile=True"])
def test_the_callers_torch_compile_keeps_an_input_s_own_strides(ours, route):
    """Inside the caller's own torch.compile, a layer reading the program's input (or what
    functions alone made of it) learns its result's layout from the input's real strides:
    normalising the size-1 batch dim's stride of an HWC image (3, 1, 18, 3) learned
    channels-last, where the member's conv gives contiguous (1.07 off through a reshape
    write)."""
    torch.manual_seed(0)
    kind = _WritesThroughReshape if route == "input" else _SlicesThenWrites
    members = [kind() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused", compile=ours)
    compiled = torch.compile(ens)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(6, 6, 3).permute(2, 0, 1)[None]
            expected = torch.stack([m(x) for m in members])
            torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=0)


class _TimesT(nn.Module):
    """A float argument a caller may change on every call (a temperature)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor, t: float = 1.0) -> Tensor:
        return self.lin(x) * t


def test_programs_the_bound_dropped_let_go_of_the_parameters():
    """A program dropped from the bounded memo (see remember) but still held by the fast path
    kept views of the weights, and a conversion that swaps parameters refused them."""
    from vensemble.backends.fused import MAX_SIGNATURES

    ens = ve.Ensemble.from_factory(_TimesT, N, backend="fused")
    x = torch.randn(2, 3)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the bound's own warning)
        ens(x)
        ens(x)  # the fast path holds this program now
        for i in range(MAX_SIGNATURES + 10):
            ens(x, 1.0 + i / 1000)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        ens.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    x = x.double()
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in ens.unstack()]))


def test_a_changing_non_tensor_argument_is_remembered_for_a_bounded_number_of_signatures():
    from vensemble.backends.fused import MAX_SIGNATURES

    ens = ve.Ensemble.from_factory(_TimesT, N)
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(MAX_SIGNATURES + 20):
            t = 1.0 + i / 1000
            torch.testing.assert_close(ens(x, t), torch.stack([m(x, t) for m in ens.unstack()]))
    assert len(ens._fused.programs) <= MAX_SIGNATURES and len(ens._choices) <= MAX_SIGNATURES
    grew = [w for w in caught if "call signatures" in str(w.message)]
    assert len(grew) == 2, [str(w.message) for w in grew]  # once for programs, once for auto
    assert "as a tensor" in str(grew[0].message)


def test_a_used_ensemble_deep_copies_and_pickles_with_fresh_programs(tmp_path):
    ens = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 3)
    x = torch.randn(2, 4)
    expected = ens(x)
    twin = copy.deepcopy(ens)
    torch.testing.assert_close(twin(x), expected)
    with torch.no_grad():
        twin.get_parameter("0.weight").zero_()
    torch.testing.assert_close(ens(x), expected)  # the copy owns its own state
    torch.save(ens, tmp_path / "ens.pt")
    loaded = torch.load(tmp_path / "ens.pt", weights_only=False)
    torch.testing.assert_close(loaded(x), expected)


class _WithConstants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + torch.arange(4.0) * torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_tensor_constants_in_the_forward_leave_the_architecture_unchanged():
    members = [_WithConstants() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    before = ve.fingerprint(ens.member(0))
    x = torch.randn(2, 4)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    assert "(fused)" not in ens.explain()
    assert ve.fingerprint(ens.member(0)) == before == ve.fingerprint(members[0])


@pytest.mark.parametrize("fused_adam", [False, True], ids=["sgd", "fused-adam"])
def test_inference_follows_in_place_updates(fused_adam):
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))

    ens = ve.Ensemble.from_factory(make, 3, backend="fused")
    xs = torch.randn(3, 5, 4)
    # a fused optimizer updates in place without moving the tensors' version counters
    if fused_adam:
        opt: torch.optim.Optimizer = torch.optim.Adam(ens.parameters(), lr=0.1, fused=True)
    else:
        opt = torch.optim.SGD(ens.parameters(), lr=0.5)
    for _ in range(3):
        with torch.no_grad():  # inference must see every step's weights
            expected = torch.stack([m(x) for m, x in zip(ens.unstack(), xs)])
            torch.testing.assert_close(ens(xs, in_dims=0), expected)
        ens(xs, in_dims=0).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    other = ve.Ensemble.from_factory(make, 3, seed=9)
    ens.load_state_dict(other.state_dict())
    with torch.no_grad():
        expected = torch.stack([m(x) for m, x in zip(other.unstack(), xs)])
        torch.testing.assert_close(ens(xs, in_dims=0), expected)


class _Views(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))  # batched kernels may hand back a transposed layout
        h = h.view(h.size(0), 2, 4)  # a member's view of a contiguous tensor
        return self.b(h)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_views_work_whatever_layout_the_kernels_return(per_member):
    from vensemble.backends import _autotune

    members = [_Views() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    xs = torch.randn(N, 5, 6)
    for forced in ("wide", "bmm"):
        for key in [k for k in _autotune._CACHE if k[0] == "linear-shared"]:
            _autotune._CACHE[key] = forced
        out = ens(xs, in_dims=0) if per_member else ens(xs[0])
        expected = torch.stack([m(xs[i] if per_member else xs[0]) for i, m in enumerate(members)])
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        assert out.is_contiguous() and "(fused)" not in ens.explain()


def test_one_tensor_elementwise_functions_are_called_directly_and_others_aligned():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("scale", torch.tensor([1.0, 2.0, 3.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc(x))  # one tensor: called as is (in place: fc's own output)
            return torch.mul(h, self.scale) + torch.sigmoid(h)  # a stacked buffer: aligned

    ens = ve.Ensemble.from_factory(Functional, 3, backend="fused").double()
    with torch.no_grad():
        ens.scale.copy_(torch.arange(9.0).view(3, 3))  # a different buffer per member
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.stack([m(x) for m in ens.unstack()])
    torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)
    code = ens._fused.last.module.code
    assert "torch.relu_(" in code and "torch.sigmoid(" in code  # h has two readers
    assert "torch.mul(" not in code  # its second argument needs the member dim aligned


class _Activations(nn.Module):
    """Activations after batched layers: in place where the layer's output has one reader."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(12, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.relu(self.fc1(h))
        g = self.fc2(h)
        h = torch.sigmoid(g) + g  # g has two readers: sigmoid must not overwrite it
        return self.fc3(torch.relu(h))  # the sum is not a layer's output: left alone


@pytest.mark.parametrize("per_member", [False, True])
def test_activations_in_place_match_the_loop_forward_and_backward(per_member: bool):
    ens = ve.Ensemble.from_factory(_Activations, 3, backend="fused").double()
    loop = ve.Ensemble.from_factory(_Activations, 3, backend="loop").double()
    x = torch.randn(3, 4, 2, 4, 4, dtype=torch.float64) if per_member else None
    x = x if x is not None else torch.randn(4, 2, 4, 4, dtype=torch.float64)
    kw = {"in_dims": 0} if per_member else {}
    for _ in range(2):  # the second call: the fast path
        ens.zero_grad(), loop.zero_grad()
        out, want = ens(x, **kw), loop(x, **kw)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
        out.square().sum().backward()
        want.square().sum().backward()
        for (k, p), q in zip(ens.named_parameters(), loop.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=0, msg=k)
    code = ens._fused.last.module.code
    assert code.count("torch.tanh_(") == 1 and code.count("torch.relu_(") == 1
    assert "torch.sigmoid(" in code and "torch.relu(" in code


def test_torch_stateless_layers_on_a_shared_input_skip_module_call_but_not_hooks():
    def make() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))

    ens = ve.Ensemble.from_factory(make, 3, backend="fused")
    x = torch.randn(4, 3, 4)
    expected = torch.stack([m(x) for m in ens.unstack()])
    torch.testing.assert_close(ens(x), expected)
    code = ens._fused.last.module.code
    assert "flatten_forward(" in code and "getattr(self" not in code, code
    seen: list[torch.Size] = []
    ens.get_submodule("0").register_forward_hook(lambda m, args, out: seen.append(out.shape))
    torch.testing.assert_close(ens(x), expected)  # a hook after the program: it still runs
    assert seen == [torch.Size([4, 12])] * 3


def test_a_stateless_module_called_twice_on_a_shared_input_stays_fused():
    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(2)
            self.head = nn.Linear(16 + 4, 2)

        def forward(self, x: Tensor) -> Tensor:
            x2 = self.pool(x)
            x4 = self.pool(x2)  # the same module again
            return self.head(torch.cat([x2.flatten(1), x4.flatten(1)], 1))

    ens = ve.Ensemble.from_factory(Pyramid, 3, backend="fused")
    x = torch.randn(5, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FallbackWarning: the program builds
        out = ens(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in ens.unstack()]))
    assert ens._fused.last.module.code.count("avgpool2d_forward(") == 2


@pytest.mark.parametrize("momentum", [0.1, None])
def test_float32_batchnorm_on_bfloat16_activations_keeps_the_activations_dtype(momentum):
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=momentum))

    ens = ve.Ensemble.from_factory(net, 3, backend="fused").to(torch.bfloat16)
    ens.get_submodule("1").float()
    loop = ve.Ensemble.from_factory(net, 3, backend="loop").to(torch.bfloat16)
    loop.get_submodule("1").float()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(5, 4, dtype=torch.bfloat16)
    for mode in (True, False):
        ens.train(mode), loop.train(mode)
        got, expected = ens(x), loop(x)
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
        for key, b in ens.named_buffers():  # float32 running statistics, updated alike
            torch.testing.assert_close(b, loop.get_buffer(key), atol=1e-3, rtol=1e-3, msg=key)


def test_batchnorm_that_stopped_tracking_leaves_its_buffers_alone_in_training():
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))

    ens = ve.Ensemble.from_factory(net, 3, backend="fused")
    loop = ve.Ensemble.from_factory(net, 3, backend="loop")
    for e in (ens, loop):
        e.get_submodule("1").track_running_stats = False  # after construction: buffers remain
    x = torch.randn(5, 4)
    torch.testing.assert_close(ens(x), loop(x))
    for key, b in ens.named_buffers():
        torch.testing.assert_close(b, loop.get_buffer(key), msg=key)
    assert torch.equal(ens.get_buffer("1.running_mean"), torch.zeros(3, 6))


def test_a_batchnorm_given_the_wrong_number_of_dims_raises_as_the_layer_does():
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm1d(3))  # 4-D into BatchNorm1d

    x = torch.randn(5, 2, 6, 6)
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        ve.Ensemble.from_factory(net, 3, backend="loop")(x)
    ens = ve.Ensemble.from_factory(net, 3, backend="fused")
    before = {k: b.clone() for k, b in ens.named_buffers()}
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        ens(x)
    for key, b in ens.named_buffers():  # nothing updated on the way
        torch.testing.assert_close(b, before[key], msg=key)


@pytest.mark.parametrize("backend", ["fused", "auto", "loop"])
def test_a_channelwise_prelu_given_a_1d_input_raises_as_the_layer_does(backend):
    # torch counts one channel in an input of fewer than 2 dims, so PReLU(5) refuses (5,); the
    # fused layer took the 5 elements for channels and returned what no member could
    ens = ve.Ensemble.from_factory(lambda: nn.PReLU(5), 3, backend=backend)
    with pytest.raises(RuntimeError, match="Found parameter numbers = 5 and channel size = 1"):
        nn.PReLU(5)(torch.randn(5))
    with pytest.raises(RuntimeError, match="Found parameter numbers = 5 and channel size = 1"):
        ens(torch.randn(5))
    with pytest.raises(RuntimeError, match="Found parameter numbers = 5 and channel size = 1"):
        ens(torch.randn(3, 5), in_dims=0)
    single = ve.Ensemble.from_factory(lambda: nn.PReLU(), 3, backend=backend)
    x = torch.randn(5)
    expected = torch.stack([m(x) for m in single.unstack()])
    torch.testing.assert_close(single(x), expected)


@pytest.mark.parametrize(
    "options",
    [
        {"max_norm": 1.0},
        {"max_norm": 1.0, "norm_type": 1.0},
        {"scale_grad_by_freq": True},
        {"sparse": True},
        {"sparse": True, "padding_idx": 0},
    ],
    ids=["max_norm", "max_norm_l1", "scale_grad_by_freq", "sparse", "sparse_padding"],
)
@pytest.mark.parametrize("backend", ["fused", "auto", "loop"])
def test_embedding_options_train_as_the_members_alone(options, backend):
    """Against the members alone in plain PyTorch: outputs, gradients (sparse ones sparse) and
    the renormalised tables (max_norm rewrites them in place, under autograd too: the loop
    gives such a table one select view per member, since unbind's views must not be
    modified in place)."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Embedding(10, 4, **options), nn.Flatten(), nn.Linear(12, 1))

    idx = torch.tensor([[1, 2, 2], [3, 3, 0]])
    ens = ve.Ensemble.from_factory(make, 3, seed=0, backend=backend)
    with torch.no_grad():
        ens.get_parameter("0.weight").mul_(5)  # rows over max_norm
    alone = ens.unstack()
    out = ens(idx)
    out.sum().backward()
    weight = ens.get_parameter("0.weight")
    assert weight.grad is not None and weight.grad.is_sparse == options.get("sparse", False)
    for i, m in enumerate(alone):
        expected = m(idx)
        expected.sum().backward()
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(weight[i], m[0].weight, atol=1e-6, rtol=1e-5)
        grad, own = weight.grad[i], m[0].weight.grad
        torch.testing.assert_close(grad.to_dense(), own.to_dense(), atol=1e-6, rtol=1e-5)
    if backend != "loop":
        assert ens.explain()["0"].startswith("fused")


@pytest.mark.parametrize("shape", [(3, 7, 5), (3, 5), (4, 5)])
def test_dropout_in_eval_mode_on_a_shared_input_keeps_the_member_dim(shape):
    """The identity in eval mode: its output must still have the member dim (a first input dim
    of N was read as the members)."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Dropout(0.1), nn.Linear(5, 4))

    ens = ve.Ensemble.from_factory(make, 3, backend="fused").eval()
    alone = ens.unstack()
    x = torch.randn(shape)
    out = _call_without_fallback(ens, x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in alone]), atol=1e-6, rtol=1e-5)


class _OpsByName(nn.Module):
    """Tensor methods and functions called with new leading dims or torch's keyword names."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which
        self.lin = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)  # (B, 4)
        if self.which == "expand":  # a new leading dim of size 2 (= N: it lined up with it)
            return h.expand(2, h.shape[0], 4) * torch.arange(1.0, 3.0).view(2, 1, 1)
        if self.which == "expand_size":
            return h.expand(size=(3, h.shape[0], 4)).sum(0)
        if self.which == "softmax":
            return F.softmax(h, dim=-1) + F.log_softmax(h, dim=-1)
        if self.which == "size":
            return h * h.size(dim=1)
        if self.which == "chunk":
            return h.chunk(chunks=2, dim=1)[0] + h.split(split_size=2, dim=1)[1]
        if self.which == "transpose":
            return h.transpose(dim0=0, dim1=1) + h.permute(dims=(1, 0))
        raise AssertionError(self.which)


@pytest.mark.parametrize(
    "which", ["expand", "expand_size", "softmax", "size", "chunk", "transpose"]
)
def test_tensor_ops_with_new_dims_or_keyword_names_stay_fused_and_exact(which):
    ens = ve.Ensemble.from_factory(lambda: _OpsByName(which), 2, backend="fused").double()
    alone = ens.unstack()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    out = _call_without_fallback(ens, x)
    expected = torch.stack([m(x) for m in alone])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [x, ens.get_parameter("lin.weight")])
    x_alone = torch.autograd.grad(expected.square().sum(), x)[0]
    torch.testing.assert_close(grads[0], x_alone, atol=1e-10, rtol=1e-10)
    for i, m in enumerate(alone):
        (g,) = torch.autograd.grad(m(x).square().sum(), m.lin.weight)
        torch.testing.assert_close(grads[1][i], g, atol=1e-10, rtol=1e-10)
    assert "vmap" not in "".join(ens.explain().values())


class _Scaled(nn.Module):
    """A per-member input scaler in buffers, used through ops on the buffers alone."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.randn(4))
        self.register_buffer("sigma", torch.rand(4) + 0.5)
        self.register_buffer("count", torch.zeros(()))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:  # an EMA of the inputs, updated in place
            self.count.add_(1)
            self.mu.lerp_(x.mean(0), 0.1)
            self.sigma.mul_(0.9).add_(0.1 * x.std(0))
        return self.fc((x - self.mu) / self.sigma.clamp(min=1e-6))


@pytest.mark.parametrize("backend", ["fused", "auto"])
@pytest.mark.parametrize("batch", [1, N, 5])
def test_ops_on_buffers_alone_run_per_member_on_every_call(backend, batch):
    # fx ran `sigma.clamp(...)` and the in-place EMA once, at trace time, on the stacked
    # buffers, and the program took the result for a constant shared by all members
    torch.manual_seed(0)
    members = [_Scaled().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    for step in range(3):
        x = torch.randn(batch + 1, 4, dtype=torch.float64)  # (std needs 2 samples)
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]), msg=str(step))
    for key, b in ens.named_buffers():
        torch.testing.assert_close(b, torch.stack([m.get_buffer(key) for m in members]))
    assert ens.get_buffer("count").tolist() == [3.0] * N
    # in place into the stacked buffers (vmap's per-op route warned: no rule for lerp_)
    routes = [how for name, how in ens.explain().items() if name.startswith(("lerp_", "mul_"))]
    assert routes and all(how.startswith("fused: elementwise") for how in routes), ens.explain()
    ens.eval()
    x = torch.randn(batch, 4, dtype=torch.float64)
    expected = torch.stack([m.eval()(x) for m in members])
    with torch.no_grad():
        for _ in range(2):  # the fast path too
            torch.testing.assert_close(ens(x), expected)


class _Accumulates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.zeros(4)  # made from constants: a trace makes it once
        s += x.mean(0)
        return self.fc(x - s)


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_tensor_made_from_constants_and_written_in_place_starts_afresh_each_call(backend):
    torch.manual_seed(0)
    members = [_Accumulates() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    expected = torch.stack([m(x) for m in members])
    with torch.no_grad():
        for call in range(3):  # the sums carried over from call to call
            torch.testing.assert_close(ens(x), expected, msg=f"call {call}")


class _AugmentedAfterAView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        v = h.view(-1)  # sees every write into h below
        h += 1
        h *= self.scale
        h -= 0.25
        h /= 2
        return v


@pytest.mark.parametrize("backend", ["fused", "auto"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_augmented_assignments_write_in_place(backend, grad):
    # fx records `h += 1` on a traced value as `h = h + 1`: a view taken before lost the write
    torch.manual_seed(0)
    members = [_AugmentedAfterAView().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    loop = ve.Ensemble(copy.deepcopy(members), backend="loop")
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        out, expected = ens(x), loop(x)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        if grad:
            out.square().sum().backward()
            expected.square().sum().backward()
            for (name, p), q in zip(ens.named_parameters(), loop.parameters()):
                torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=name)
    if backend == "fused":
        (program,) = ens._fused.programs.values()
        assert not isinstance(program, str), program
        assert any("iadd" in name for name in program.parts)


class _IncrementsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x += 1
        return self.a(x)


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_an_augmented_assignment_to_the_input_reaches_the_callers_tensor(backend):
    torch.manual_seed(0)
    members = [_IncrementsItsInput().double() for _ in range(N)]
    x = torch.randn(N, 5, 8, dtype=torch.float64)
    ours, theirs = x.clone(), x.clone()
    with torch.no_grad():
        out = ve.Ensemble(copy.deepcopy(members), backend=backend)(ours, in_dims=0)
        expected = ve.Ensemble(copy.deepcopy(members), backend="loop")(theirs, in_dims=0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours, x + 1, atol=0, rtol=0)
    torch.testing.assert_close(theirs, x + 1, atol=0, rtol=0)


class _CountsItsCalls(nn.Module):
    def __init__(self, augmented: bool) -> None:
        super().__init__()
        self.augmented = augmented
        self.a = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.augmented:
            self.count += 1  # in place, then assigned back: the same tensor
        else:
            self.count = self.count + 1  # a new tensor: fx keeps no assignment
        return self.a(x) * self.count


@pytest.mark.parametrize("augmented", [True, False], ids=["+=", "= +"])
def test_a_forward_that_assigns_a_buffer_counts_as_the_loop_does(augmented):
    # fx's trace assigned a Proxy into the buffer slot, which stayed there: fused returned a
    # Proxy, and so did every later call
    torch.manual_seed(0)
    members = [_CountsItsCalls(augmented).double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    loop = ve.Ensemble(copy.deepcopy(members), backend="loop")
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in range(3):
            torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0, msg=f"call {call}")
    torch.testing.assert_close(ens.count, loop.count, atol=0, rtol=0)
    # (a new tensor assigned to a member's slot is dropped when the loop puts the stack back)
    assert loop.count.tolist() == ([3.0] * N if augmented else [0.0] * N)
    (program,) = ens._fused.programs.values()
    if augmented:  # fused as written
        assert not isinstance(program, str), program
        assert not caught
    else:  # refused, run by vmap; explain() gives the reason
        assert "stores 'count'" in program
        assert "stores 'count'" in str(ens.explain())


class _Accumulator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.zeros_like(x)  # the same for every member (x is shared)
        out += self.a(x)  # ... until a member's value is added
        out += self.b(x)
        return out


def test_a_shared_value_the_forward_made_takes_a_per_member_augmented_assignment():
    torch.manual_seed(0)
    members = [_Accumulator().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 4, dtype=torch.float64)
    out = _call_without_fallback(ens, x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]), atol=1e-12, rtol=0)


class _AccumulatesInto(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 4).double()

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "float32":  # the in-place op keeps the left side's dtype
            acc = torch.zeros_like(x, dtype=torch.float32)
            acc += self.a(x)
            return acc
        if self.kind == "viewed":  # a view taken before sees the write
            y = x * 2
            z = y.view(-1)
            y += self.a(x)
            return z.view(x.shape) * 1
        acc = x[0] * 0  # "broadcast": in place, (4,) cannot take (5, 4): raises
        acc += self.a(x)
        return acc


@pytest.mark.parametrize("kind", ["float32", "viewed", "broadcast"])
def test_a_per_member_augmented_assignment_into_a_shared_value_follows_the_in_place_rules(kind):
    torch.manual_seed(0)
    members = [_AccumulatesInto(kind) for _ in range(N)]
    x = torch.randn(5, 4, dtype=torch.float64)
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    if kind == "broadcast":
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
            members[0](x)
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
            ens(x)
        return
    expected = torch.stack([m(x) for m in members])
    if kind == "viewed":  # the view would have to be per member too: the members run alone
        with pytest.warns(ve.FallbackWarning):
            out = ens(x)
    else:
        out = ens(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    if kind == "viewed":  # and the gradients reach the members' weights
        out.sum().backward()
        expected.sum().backward()
        for i, m in enumerate(members):
            torch.testing.assert_close(ens.a.weight.grad[i], m.a.weight.grad, atol=1e-12, rtol=0)


class _PowThenAccumulates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        out = 2**x  # pow saves its result for the backward
        out += self.a(x)  # ... which this overwrites: the member's backward raises
        return out


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_write_into_what_pow_saved_breaks_the_backward_as_in_the_member(backend):
    torch.manual_seed(0)
    members = [_PowThenAccumulates() for _ in range(N)]
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        members[0](x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ve.FallbackWarning)
        out = ve.Ensemble(copy.deepcopy(members), backend=backend)(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class _BumpsItsBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        self.a.bias.add_(1.0)  # raises under autograd (a leaf), runs without
        return self.a(x)


def test_auto_does_not_time_forwards_alone_after_a_forward_raised_under_autograd():
    # only a backward's failure is retried without autograd: here the forward itself raised,
    # and timing it without autograd wrote into the parameters again and again
    torch.manual_seed(0)
    members = [_BumpsItsBias() for _ in range(N)]
    x = torch.randn(8, 4)
    changes = {}
    for backend in ("fused", "auto"):
        ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
        before = ens.a.bias.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ve.FallbackWarning)
            with pytest.raises(RuntimeError):  # (the loop's: a view of the stacked bias)
                ens(x)
        changes[backend] = (ens.a.bias.detach() - before).unique().tolist()
    assert changes["auto"] == changes["fused"]


class _OverwritesWhatSigmoidSaved(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.sigmoid(self.a(x))
        h += 1  # sigmoid's backward needs h: a backward raises, the forward is fine
        return h


def test_auto_runs_a_forward_whose_backward_would_raise_as_the_member_does():
    torch.manual_seed(0)
    members = [_OverwritesWhatSigmoidSaved() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="auto")
    x = torch.randn(5, 4)
    out = ens(x)  # with autograd on: auto times forward and backward, which raised
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class _NormalisesObservations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.register_buffer("mu", torch.randn(4))
        self.register_buffer("sd", torch.rand(4) + 0.5)

    def forward(self, obs: Tensor) -> Tensor:
        x = obs.float()  # uint8 observations: new memory
        x -= self.mu  # per-member statistics, written in place
        x /= self.sd
        return self.a(x)


def test_a_conversion_of_a_shared_input_takes_per_member_augmented_assignments_fused():
    # after fe5033d this fell back to a per-member loop (4.5x slower): the conversion's new
    # memory is copied per member, as each member's own conversion is its own tensor
    torch.manual_seed(0)
    members = [_NormalisesObservations() for _ in range(N)]
    obs = torch.randint(0, 255, (6, 4), dtype=torch.uint8)
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    out = _call_without_fallback(ens, obs)
    torch.testing.assert_close(out, torch.stack([m(obs) for m in members]))
    assert "IntoMemberCopies" in str(ens._fused.programs)


class _WritesThroughAFormat(nn.Module):
    def __init__(self, method: str, fmt: torch.memory_format) -> None:
        super().__init__()
        self.method, self.fmt = method, fmt
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c(x)
        getattr(h, self.method)(memory_format=self.fmt).mul_(0)  # a copy, or h itself
        return h


@pytest.mark.parametrize("method", ["to", "contiguous"])
@pytest.mark.parametrize(
    "fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_a_memory_format_change_copies_where_the_members_does(method, fmt, layout):
    # torch decides on the stacked tensor, one dim more, otherwise: to() never copies a 5-d
    # tensor for contiguous_format, contiguous() refuses channels_last
    torch.manual_seed(0)
    members = [_WritesThroughAFormat(method, fmt).double() for _ in range(N)]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        out = _call_without_fallback(ve.Ensemble(copy.deepcopy(members), backend="fused"), x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


class _TemperatureHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.fc(x) / self.temperature, -1)


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_plain_setting_changed_after_calls_is_used(backend):
    # fx writes `self.temperature` into the program: annealing it changed nothing
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 4), nn.ReLU(), _TemperatureHead()) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with torch.no_grad():
        for temperature in (1.0, 0.1, 0.5):
            for m in [*members, ens]:
                m.get_submodule("2").temperature = temperature
            expected = torch.stack([m(x) for m in members])
            for _ in range(2):
                torch.testing.assert_close(ens(x), expected, msg=str(temperature))
    assert ens.member(1)[2].temperature == 0.5


@dataclasses.dataclass
class _Config:
    tau: float = 1.0
    shift: float = 0.0


@dataclasses.dataclass(slots=True)
class _Slotted:
    gain: float = 1.0


class _Configured(nn.Module):
    """Settings held in containers and on a torch layer, all read by this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.fc.gain = 1.0  # a plain attribute put on torch's layer, read by the parent
        self.fc._mine = 1.0  # a private one
        self.cfg = _Config()
        self.slotted = _Slotted()
        self.extra = {"scale": 1.0}
        self.ns = types.SimpleNamespace(bias=0.0)
        self.offsets = [0.0]
        self.skip: set[int] = set()

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x) * self.fc.gain * self.fc._mine / self.cfg.tau + self.cfg.shift
        h = h * self.slotted.gain * (2.0 if 1 in self.skip else 1.0)
        return h * self.extra["scale"] + self.ns.bias + self.offsets[0]


_CHANGES = {
    "dataclass field": lambda m: setattr(m.cfg, "tau", 0.25),
    "second dataclass field": lambda m: setattr(m.cfg, "shift", 3.0),
    "dict value": lambda m: m.extra.__setitem__("scale", -2.0),
    "namespace field": lambda m: setattr(m.ns, "bias", 0.5),
    "list item": lambda m: m.offsets.__setitem__(0, 7.0),
    "torch layer's plain attribute": lambda m: setattr(m.fc, "gain", 4.0),
    "torch layer's private attribute": lambda m: setattr(m.fc, "_mine", -1.0),
    "slotted dataclass field": lambda m: setattr(m.slotted, "gain", 5.0),
    "set item": lambda m: m.skip.add(1),
}


@pytest.mark.parametrize("backend", ["fused", "auto"])
@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_setting_inside_a_container_changed_after_calls_is_used(backend, change):
    # fx writes self.cfg.tau, self.extra["scale"], self.fc.gain into the program: only the
    # module's own attributes were watched, so changing these after calls changed nothing
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 4), _Configured()) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
        for m in [*members, ens]:
            _CHANGES[change](m.get_submodule("1"))
        expected = torch.stack([m(x) for m in members])
        for _ in range(2):
            torch.testing.assert_close(ens(x), expected)


def test_a_forward_keeping_state_in_a_container_is_traced_once():
    # what a module's own forward assigns is its state, not a setting; a watched container
    # that only the forward's reads touch keeps the program
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 4), _Configured()) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 4)
    with torch.no_grad():
        ens(x)
        program = ens._fused.last
        ens(x)
        assert ens._fused.last is program


class _Counting(nn.Module):
    """A forward that keeps state in containers it holds (and a config it only reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.stats = {"calls": 0}
        self.seen: list[int] = []
        self.cfg = _Config()

    def forward(self, x: Tensor) -> Tensor:
        self.stats["calls"] += 1
        self.seen.append(1)
        return self.fc(x) / self.cfg.tau


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_containers_the_forward_changes_are_its_state_not_settings(backend):
    # watched as settings, each call's own change forgot the programs: a trace per call
    torch.manual_seed(0)
    members = [_Counting() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with torch.no_grad():
        ens(x)
        program = ens._fused.last
        for _ in range(5):
            ens(x)
        assert ens._fused.last is program
        assert [name for _, name, _, _ in ens._settings] == ["cfg"]  # still a setting
        for m in [*members, ens]:
            m.cfg.tau = 0.5
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))


def test_unusual_settings_are_watched_without_raising():
    from vensemble._tree import traced_settings

    class Owner:
        step = 0

    class Owned(nn.Module):
        def __init__(self, owner: Any) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.width = 4
            self.owner = owner  # a dead weakref.proxy raises for anything asked of it
            self.vocabulary = [str(i) for i in range(1000)]  # watched as one object

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x)

        def log(self) -> str:
            return f"{self.owner.step} {len(self.vocabulary)}"

        def extra_repr(self) -> str:  # (sizes: not what a forward reads)
            return f"{self.width} {self.fc.in_features}"

    owner = Owner()
    ens = ve.Ensemble([Owned(weakref.proxy(owner)) for _ in range(N)], backend="fused")
    watched = {name: held for _, name, _, held in traced_settings(ens._module_list)}
    assert watched == {"owner": (), "vocabulary": None}
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = ens(x)
        del owner
        torch.testing.assert_close(ens(x), expected)


def _scaled(module: nn.Module, h: Tensor) -> Tensor:
    return h / module.temperature  # (read outside the class: no name of it to watch)


class _HelpedFromOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return _scaled(self, self.fc(x))


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_root_setting_written_through_the_ensemble_forgets_the_programs(backend):
    torch.manual_seed(0)
    members = [_HelpedFromOutside() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with torch.no_grad():
        ens(x)
        ens.temperature = 0.25
        for m in members:
            m.temperature = 0.25
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))


class _RootTemperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = 1.0
        self._private = 2.0

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) / self.temperature * self._private


@pytest.mark.parametrize("backend", ["loop", "vmap", "fused", "auto"])
def test_a_root_setting_is_read_and_written_through_the_ensemble(backend):
    # `ens.temperature = 0.5` set an attribute on the ensemble that no member read, and
    # `ens.temperature` raised AttributeError: the setting is the template's, every member's
    torch.manual_seed(0)
    members = [_RootTemperature() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    assert ens.temperature == 1.0
    with torch.no_grad():
        ens(x)
        for temperature in (0.5, 0.125):
            ens.temperature = temperature
            for m in members:
                m.temperature = temperature
            for _ in range(2):
                torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
    assert "temperature" not in ens.__dict__
    assert ens.temperature == 0.125 and ens.member(2).temperature == 0.125
    assert [m.temperature for m in ens.unstack()] == [0.125] * N
    with pytest.raises(AttributeError):
        getattr(ens, "_private")  # noqa: B009  (a private name is the ensemble's own)
    ens.note = "mine"  # a name the member does not have stays on the ensemble
    assert ens.__dict__["note"] == "mine" and not hasattr(ens.member(0), "note")
    with pytest.raises(AttributeError, match="nothing_here"):
        getattr(ens, "nothing_here")  # noqa: B009
    assert "temperature" in dir(ens) and "_private" not in dir(ens) and "forward" in dir(ens)
    del ens.temperature  # every member's
    assert not hasattr(ens, "temperature") and not hasattr(ens.member(0), "temperature")
    del ens.note
    assert "note" not in ens.__dict__
    ens.temperature = 0.5  # set again after its deletion: every member's again
    assert "temperature" not in ens.__dict__ and ens.member(1).temperature == 0.5


class _OptionalMask(nn.Module):
    mask: Tensor | None = None  # a class default, not set in __init__

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return y if self.mask is None else y * self.mask


@pytest.mark.parametrize("backend", ["loop", "fused", "auto"])
def test_a_setting_with_a_class_default_is_the_members(backend):
    # ens.mask = ... set an attribute on the ensemble; the members kept the class's None
    torch.manual_seed(0)
    members = [_OptionalMask() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    assert ens.mask is None and "mask" in dir(ens)
    with torch.no_grad():
        ens(x)
        ens.mask = torch.zeros(3)
        for m in members:
            m.mask = torch.zeros(3)
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
        assert (ens(x) == 0).all() and "mask" not in ens.__dict__
        del ens.mask  # the class default again
        for m in members:
            del m.mask
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))
        assert ens.mask is None


class _KeepsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.last: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        self.last = h.detach()  # (in place of a forward hook)
        return h


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_forward_that_stores_on_its_module_runs_as_the_loop_does(backend):
    # the trace left an fx Proxy there, then vmap a batched tensor that escaped (and broke
    # member(i), which deep-copies it); as a per-member loop the last member's value stays
    torch.manual_seed(0)
    members = [nn.Sequential(_KeepsLast(), nn.Linear(4, 2)) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    strict = ve.Ensemble(copy.deepcopy(members), backend="vmap")
    x = torch.randn(5, 4)
    with pytest.warns(ve.FallbackWarning, match="stores 'last' on the module"):
        out = ens(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    last = ens.get_submodule("0").last
    assert type(last) is Tensor
    torch.testing.assert_close(last, members[-1][0].last)
    assert type(ens.member(0)[0].last) is Tensor
    with pytest.raises(ve.EnsembleError, match=r"'0' \(_KeepsLast\).*stores 'last'"):
        strict(x)


class _PlainStats(nn.Module):
    def __init__(self, mean: Tensor) -> None:
        super().__init__()
        self.obs_mean = mean  # a plain attribute, not a buffer: not stacked
        self.fc = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x - self.obs_mean)


def test_members_whose_plain_tensor_attributes_differ_are_warned_of():
    # every backend computes all members with member 0's values: said now, not silently
    members = [_PlainStats(torch.full((4,), float(i))) for i in range(N)]
    with pytest.warns(UserWarning, match=r"member 1's .*'obs_mean'.*register_buffer"):
        ve.Ensemble(members)
    in_a_list = [_PlainStats(torch.ones(4)) for _ in range(N)]
    for i, m in enumerate(in_a_list):
        m.extra = [torch.zeros(2), {"scale": torch.full((3,), float(i))}]  # (two deep: not told)
        m.stats = {"scale": torch.full((3,), float(i))}
    with pytest.warns(UserWarning, match=r"member 1's .*'stats\['scale'\]'.*nn.ParameterList"):
        ve.Ensemble(in_a_list)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an RNN's list of its own parameters: they are stacked
        ve.Ensemble([nn.LSTM(3, 4, num_layers=2) for _ in range(N)])
    same = [_PlainStats(torch.ones(4)) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(same))
    x = torch.randn(5, 4)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in same]))


@pytest.mark.parametrize(
    ("factory", "randomness"),
    [
        (lambda: nn.Sequential(nn.Linear(6, 6), nn.RReLU()), "different"),
        (lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 6), nn.RReLU()), "same"),
    ],
    ids=["rrelu-falls-back", "rrelu-same-falls-back"],
)
def test_a_seeded_call_after_a_fallback_gives_what_every_later_one_gives(factory, randomness):
    # the failed attempts drew random numbers: the first seeded call differed from the rest
    torch.manual_seed(0)
    ens = ve.Ensemble.from_factory(factory, 3, randomness=randomness, backend="fused").train()
    x = torch.ones(4, 6)
    outs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ve.FallbackWarning)
        for _ in range(3):
            torch.manual_seed(1)
            outs.append(ens(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def _assert_outputs_and_gradients_equal_the_members(
    ens: ve.Ensemble, members: list[nn.Module], out: Tensor, x: Tensor
) -> None:
    """``out = ens(x)`` and the parameters' gradients of a loss on it equal the members'
    alone (float64: to 1e-12)."""
    _assert_equal_with_gradients(ens, members, out, torch.stack([m(x) for m in members]))


def _assert_equal_with_gradients(
    ens: ve.Ensemble, members: list[nn.Module], out: Tensor, expected: Tensor
) -> None:
    """``out`` equals ``expected`` (the members' outputs stacked), and so do the parameters'
    gradients of a loss on each (float64: to 1e-12)."""
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    for key, g in _grads(ens).items():
        want = torch.stack([_grads(m)[key] for m in members])
        torch.testing.assert_close(g, want, atol=1e-12, rtol=0, msg=key)


class _AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        out, _ = self.attn(h, h, h, need_weights=False)  # (out, None)
        return x + out


def test_a_submodule_returning_none_runs_under_vmap():
    # vmap returns tensors only: the attention's (out, None) sent it to a per-member loop
    torch.manual_seed(0)
    members = [_AttentionBlock().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        out = ens(x)
    assert ens.explain()["attn"] == "vmap"
    _assert_outputs_and_gradients_equal_the_members(ens, members, out, x)


class _Helped(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width  # read only here: nothing to watch
        self.fc = nn.Linear(width, 3)
        self._temperature = 1.0

    def _scaled(self, h: Tensor) -> Tensor:
        return h / self._temperature  # read by a method the forward calls

    def forward(self, x: Tensor) -> Tensor:
        return self._scaled(self.fc(x))


def test_only_the_settings_the_code_reads_are_watched():
    from vensemble._tree import traced_settings

    m = _Helped(4)
    assert [name for _, name, _, _ in traced_settings(list(m.modules()))] == ["_temperature"]
    torch.manual_seed(0)
    members = [nn.Sequential(_Helped(4)) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 4)
    with torch.no_grad():
        for t in (1.0, 0.25):
            for model in [*members, ens]:
                model.get_submodule("0")._temperature = t
            torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]))


class _Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0
        self.last_scale = 1.0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1  # the module's own state, stored by forward
        self.last_scale = float(x.shape[0]) * 0.5  # (fx cannot trace it: vmap runs it)
        return torch.relu(self.fc(x)) * self.last_scale


@pytest.mark.parametrize("backend", ["fused", "auto", "vmap"])
def test_a_forward_storing_plain_values_runs_without_retracing(backend, monkeypatch):
    # vmap refused a counter as an escaping batched tensor, and a float stored by forward
    # counted as a changed setting: every call traced again (8x slower)
    import vensemble.backends.fused as fused_module

    traces = []
    trace = fused_module._trace
    monkeypatch.setattr(fused_module, "_trace", lambda *a: traces.append(1) or trace(*a))
    torch.manual_seed(0)
    members = [nn.Sequential(_Counts(), nn.Linear(4, 2)) for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        for _ in range(5):
            out = ens(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]))
    assert len(traces) <= 1
    assert ens.get_submodule("0").calls >= 5 and ens.get_submodule("0").last_scale == 2.5


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        if x.sum() > -1e9:  # control flow on the (shared) input: fx cannot trace it, vmap can
            h = h * 2
        return self.out(h)


@pytest.mark.parametrize("backend", ["vmap", "fused", "auto"])
def test_vmap_under_autocast_returns_the_members_dtype(backend):
    # vmap splits a batched linear into matmul (cast by autocast) and a bias add (not cast):
    # the float32 bias promoted the outputs to float32 where each member gives bfloat16
    torch.manual_seed(0)
    members = [_Gated() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore", ve.FallbackWarning)
        expected = torch.stack([m(x) for m in members])
        out = ens(x)
    assert expected.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    # (one bfloat16 rounding apart: the bias is added after the product is rounded)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=1e-2)


class _FillsFromAState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("s0", torch.randn(()))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h.masked_fill_(x > 0, self.s0)  # a per-member 0-d value
        h[:, 0].fill_(self.s0)
        return h


def test_fill_with_a_per_member_value_stays_in_the_fused_program():
    # aligned to (N, 1, 1), the value was refused ("only supports a 0-dimensional value")
    torch.manual_seed(0)
    members = [_FillsFromAState().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        out = ens(x)
    assert "(fused)" not in ens.explain()
    assert ens.explain()["masked_fill_ (masked_fill_)"].startswith("fused: per-member fill")
    _assert_outputs_and_gradients_equal_the_members(ens, members, out, x)


class _NestedAutocast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4) * 0.3)
        self.b = nn.Parameter(torch.randn(3))
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.w, self.b)  # on its own parameters: one vmapped op
        if x.dim() == 2:  # (under the fused program only this op is vmapped; else all)
            h = h * 1.0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.out(h)


@pytest.mark.parametrize("backend", ["vmap", "fused"])
def test_vmapped_linear_under_nested_autocast_returns_the_members_dtype(backend):
    # the cast read the outer autocast's dtype once (float16: the result promoted to float32),
    # and a single vmapped F.linear inside a fused program was not cast at all
    torch.manual_seed(0)
    members = [_NestedAutocast() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.float16), warnings.catch_warnings():
        warnings.simplefilter("ignore", ve.FallbackWarning)
        alone = [m(x) for m in members]
        out = ens(x)
    expected = torch.stack(alone)  # (outside: autocast's stack refuses mixed low precisions)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=1e-2)


class _DoublesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2)  # the caller's tensor, in place
        return self.fc(x)


def test_a_failed_attempt_after_an_input_was_modified_in_place_is_not_rerun(monkeypatch):
    # the fallback ran the forward again on the doubled input: 4x, silently
    import vensemble.backends._layers as layers

    def broken(self, x):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(layers._Linear, "forward", broken)
    ens = ve.Ensemble.from_factory(_DoublesItsInput, N, backend="fused")
    xs = torch.randn(N, 5, 4)
    with pytest.raises(
        ve.EnsembleError, match=r"modified input tensor 0 in place.*a kernel failed"
    ):
        ens(xs, in_dims=0)


class _MyLSTM(nn.LSTM):
    """A user's subclass of a torch layer whose methods reassign its bookkeeping each call."""


class _WithMyLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = _MyLSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.filterwarnings("ignore:vensemble. vmap cannot run")
def test_a_torch_layer_subclass_keeps_its_program_across_calls(monkeypatch):
    from vensemble.backends import fused as fused_module

    built: list[object] = []
    build = fused_module.build_program
    monkeypatch.setattr(fused_module, "build_program", lambda *a: built.append(a) or build(*a))
    ens = ve.Ensemble.from_factory(_WithMyLSTM, 3, backend="fused")
    loop = ve.Ensemble.from_factory(_WithMyLSTM, 3, backend="loop")
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        for _ in range(4):  # (nn.LSTM reassigns _flat_weights: not a setting)
            torch.testing.assert_close(ens(x), loop(x))
    assert len(built) == 1


class _ByMode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        scale = 2.0 if torch.is_inference_mode_enabled() else 1.0
        return self.fc(x) * scale + (10.0 if torch.is_grad_enabled() else 0.0)


def test_a_forward_branching_on_the_autograd_mode_is_traced_per_mode():
    ens = ve.Ensemble.from_factory(_ByMode, 3, backend="fused")
    loop = ve.Ensemble.from_factory(_ByMode, 3, backend="loop")
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(4, 3)
    modes = (torch.no_grad, torch.inference_mode, torch.enable_grad) * 2
    for mode in modes:
        with mode():
            for _ in range(2):  # (the second call through the fast path)
                torch.testing.assert_close(ens(x), loop(x))


def test_the_trace_guards_refuse_only_in_the_tracing_thread():
    """While a member is traced, torch's grad-mode switch and random factories refuse (fx
    would drop or freeze them), but only in the tracing thread: another thread's
    ``with torch.no_grad()`` or ``torch.randn`` raised Untraceable."""
    import threading

    from vensemble.backends.fused import Untraceable, _guarded

    seen: list[str] = []

    def bystander() -> None:
        try:
            with torch.no_grad():
                seen.append(str(torch.randn(3).shape))
        except Exception as err:
            seen.append(repr(err))

    with _guarded():
        other = threading.Thread(target=bystander)
        other.start()
        other.join()
        with pytest.raises(Untraceable, match="changes grad mode"), torch.no_grad():
            pass
        with pytest.raises(Untraceable, match=r"torch\.randn without a traced input"):
            torch.randn(3)
    assert seen == ["torch.Size([3])"]
    with torch.no_grad():  # and all put back after
        torch.randn(3)


class _SlowToTrace(nn.Module):
    """A member whose trace takes a while: other threads act meanwhile."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seconds = seconds

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            time.sleep(self.seconds)
        return self.fc(x)


def test_traces_in_several_threads_leave_torch_as_it_was():
    """fx replaces nn.Module.__call__ and __getattr__ process-wide while it traces and puts
    back what it found: an overlapping trace put the other's wrapper back for good (every
    module call in the process then raised). One trace runs at a time, and a module another
    thread calls meanwhile runs as usual."""
    import threading

    import torch.fx._symbolic_trace as symbolic

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    slow = [ve.Ensemble([_SlowToTrace(s) for _ in range(2)]) for s in (0.4, 0.6)]
    x = torch.randn(3, 4)
    errors: list[str] = []

    def first_call(ens: ve.Ensemble, delay: float) -> None:
        time.sleep(delay)
        try:
            ens(x)
        except Exception as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=first_call, args=(e, d)) for e, d in zip(slow, (0, 0.2))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    torch.testing.assert_close(
        plain(x), torch.relu(plain[0].weight @ x.T + plain[0].bias[:, None]).T
    )
    for t in threads:
        t.join()
    assert errors == []
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert not symbolic._is_fx_tracing_flag
    assert all(isinstance(e._fused.last, fused_module.FusedProgram) for e in slow)


def test_a_patch_that_fails_midway_is_undone(monkeypatch):
    randn, set_grad = torch.randn, torch._C._set_grad_enabled
    made = []

    def failing(fn, name):
        if made:
            raise KeyboardInterrupt
        made.append(name)
        return fn

    monkeypatch.setattr(fused_module, "_traced_only", failing)
    with pytest.raises(KeyboardInterrupt), fused_module._guarded():
        pass
    assert torch.randn is randn and torch._C._set_grad_enabled is set_grad
    assert fused_module._UNDO == [] and fused_module._TRACING == {}


def test_a_member_calling_an_ensemble_another_thread_calls_does_not_deadlock():
    """A member that calls a shared ensemble, traced (holding the one-trace lock) while another
    thread's first call of that ensemble holds its lock and waits to trace: each waited for
    the other. The member's trace now gives up (its ensemble runs without the fused program)."""
    import threading

    torch.manual_seed(0)
    inner = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh()), 2)
    tracing = threading.Event()

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            if isinstance(x, torch.fx.Proxy):
                tracing.set()
                time.sleep(0.5)
            return self.fc(x) + inner(x).sum(0)

    outer = ve.Ensemble.from_factory(Outer, 3)
    loop = ve.Ensemble.from_factory(Outer, 3, backend="loop")
    loop.load_state_dict(outer.state_dict())
    x, y = torch.randn(5, 4), torch.randn(7, 4)
    got: dict[str, Any] = {}

    def first_outer() -> None:
        got["outer"] = outer(x)

    def first_inner() -> None:
        tracing.wait(10)
        got["inner"] = inner(y)

    threads = [threading.Thread(target=f, daemon=True) for f in (first_outer, first_inner)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    with torch.no_grad():
        torch.testing.assert_close(got["outer"], loop(x))
        expected = torch.stack([m(y) for m in inner.unstack()])
    torch.testing.assert_close(got["inner"], expected)


class _RootScale(nn.Module):
    """Parameters read directly by the forward: the root's own, and a child's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        # reductions: a tensor taken for all members at once would be reduced over them too
        return self.lin(x) * self.scale.sum() + torch.einsum("bi,ji->bj", x, self.lin.weight)


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_functional_call_parameters_read_directly_are_each_members(backend):
    """torch.func.functional_call puts plain tensors in the parameter slots: the program reads
    them at run time, per member, as it reads Parameters (fx took them for constants: the
    program reduced over all members' values, and kept them for every later call)."""
    torch.manual_seed(0)
    members = [_RootScale().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    loop = ve.Ensemble(copy.deepcopy(members), backend="loop")
    x = torch.randn(5, 3, dtype=torch.float64)
    params = {k: torch.randn_like(v) for k, v in ens.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)  # the fused program runs it
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                got = torch.func.functional_call(ens, params, (x,))
                expected = torch.func.functional_call(loop, params, (x,))
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
        grads = torch.func.grad(lambda p: torch.func.functional_call(ens, p, (x,)).sum())(params)
        want = torch.func.grad(lambda p: torch.func.functional_call(loop, p, (x,)).sum())(params)
        for key, g in grads.items():
            torch.testing.assert_close(g, want[key], atol=1e-12, rtol=0, msg=key)
        # and the ensemble's own parameters again on the next call
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)


class _Bits(nn.Module):
    """Integer and bitwise work on a layer's output, an integer input and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("k", torch.randint(0, 7, (4,)))

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        h = self.fc(x)
        sign = (h.view(torch.int32) >> 31) & 1  # the sign bit: the float viewed as int32
        raw = h.view(dtype=torch.int32).view(h.dtype)  # and back, by keyword
        mask = (idx % 3 == 1) | (idx == 0) ^ (idx != 2)
        bits = ~(idx << 1) & self.k
        return raw + sign.float() + mask.float() + bits.float() + (self.k % 2 == 0).float()


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_dtype_views_and_bitwise_operators_run_fused(per_member):
    """view(dtype) reinterprets the member's last dim (it was taken for a shape: the program
    failed to vmap with a warning), and %, ==, !=, &, |, ^, ~, <<, >> run per element."""
    torch.manual_seed(0)
    members = [_Bits() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    lead = (N,) if per_member else ()
    x, idx = torch.randn(*lead, 2, 4), torch.randint(0, 5, (*lead, 2, 4))
    expected = torch.stack(
        [m(x[i], idx[i]) if per_member else m(x, idx) for i, m in enumerate(members)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        out = ens(x, idx, in_dims=0 if per_member else None)
    torch.testing.assert_close(out, expected)
    assert "vmap" not in ens.explain().values()


class _Writes(nn.Module):
    """Item assignments into per-member values: a layer's output and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.register_buffer("fill", torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h[:, 0] = 0.0  # a constant
        h[..., 1] = self.fill[1]  # a per-member 0-d value
        h[h > 1] = 1.0  # a per-member mask
        h[:, 2:] = self.fill[2:] * 2  # a per-member row, broadcast over the batch
        h[0] = self.fc(x)[1]  # a per-member row from another result
        h[:, torch.tensor([3])] += 0.5  # a tensor index (get, add, set)
        return self.head(h)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_item_assignments_into_per_member_values_run_fused(per_member):
    """h[...] = v was untraceable (fx's Proxy has no __setitem__): the whole model ran under
    vmap, silently. It is written past the member dim, in place, forward and backward."""
    torch.manual_seed(0)
    members = [_Writes().double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(*((N,) if per_member else ()), 5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        out = ens(x, in_dims=0 if per_member else None)
    expected = torch.stack([m(x[i] if per_member else x) for i, m in enumerate(members)])
    _assert_equal_with_gradients(ens, members, out, expected)
    assert "(fused)" not in ens.explain()
    assert ens.explain()["setitem (setitem)"].startswith("fused: written in place")
    with torch.no_grad():
        torch.testing.assert_close(ens(x, in_dims=0 if per_member else None), expected)


class _WritesIntoShared(nn.Module):
    def __init__(self, alias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.alias = alias

    def forward(self, x: Tensor) -> Tensor:
        out = x.new_zeros(x.shape[0], 8)  # made the same for every member
        out[:, 4:] = x  # a shared value into it
        right = out[:, 4:] if self.alias else None  # (a view of the shared tensor)
        out[:, :4] = self.fc(x)  # a per-member value: each member's out its own from here
        out[:, 0] += 1
        if right is not None:
            right.mul_(2)  # through the view: into every member's out
        return out * 2


@pytest.mark.parametrize("alias", [False, True], ids=["fresh", "aliased"])
def test_a_per_member_value_written_into_a_tensor_made_for_all(alias):
    """out = x.new_zeros(...); out[:, :4] = h: out is copied per member at the write and read
    as the copies after it. With a view of out taken before the write, that cannot be: the
    loop runs it (vmap refuses it too), and explain() says why."""
    torch.manual_seed(0)
    members = [_WritesIntoShared(alias).double() for _ in range(N)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings(), torch.set_grad_enabled(not alias):
        warnings.simplefilter("ignore" if alias else "error", ve.FallbackWarning)
        out = ens(x)
        expected = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    if alias:
        assert "not one it made itself (out[...] = h)" in ens.explain()["(fused)"]
        return
    assert ens.explain()["setitem (setitem_1)"].startswith("fused: the shared value copied")
    _assert_equal_with_gradients(ens, members, out, expected)


class _CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        self.count += 1  # plain Python state, read back at once
        return self.fc(x) * 0 + self.count


@pytest.mark.parametrize("backend", ["fused", "auto"])
def test_a_plain_value_the_forward_stores_is_not_frozen(backend):
    """fx traced self.count += 1 as a constant: the program returned the count the trace saw
    on every call, and never counted. It runs untraced (vmap: once per call, as one member
    alone; the loop: once per member, its members sharing the module); auto's measuring runs
    leave the count as it was."""
    ens = ve.Ensemble([_CountsCalls() for _ in range(N)], backend=backend)
    x = torch.randn(1, 2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        outs = [ens(x)[:, 0, 0].tolist() for _ in range(3)]
    assert "stores 'count'" in ens.explain()["(fused)"]
    per_call = 1 if outs[1][0] == 2 else N  # vmap's way, or the loop's
    assert ens.member(0).count == 3 * per_call
    assert outs == [[float(k * per_call + (i + 1 if per_call == N else 1)) for i in range(N)] for k in range(3)]  # fmt: skip


class _WritesApart(nn.Module):
    def __init__(self, kind: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.register_buffer("b", torch.randn(3))
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x).view(-1, 3, 4)
        if self.kind == 0:
            h[[0, 1], :, [1, 2]] = self.b  # advanced indices apart: their dims come first
        elif self.kind == 1:
            h[torch.tensor([0, 1]), ..., [1, 2]] = self.b
        else:
            h[0] = self.b.repeat(4).view(1, 3, 4)  # a value with a leading size-1 dim
        return h


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["apart", "apart-ellipsis", "leading-1"])
def test_item_assignments_with_advanced_indices_apart(kind, n):
    """h[[0, 1], :, [1, 2]] = v: torch puts the advanced dims first, so a leading slice for
    the member dim put them in front of it, and with as many members as indexed rows the
    members' values landed crosswise (torch.vmap does that too). The member dim is indexed
    with them instead."""
    torch.manual_seed(0)
    members = [_WritesApart(kind).double() for _ in range(n)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="fused")
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)
        out = ens(x)
    expected = torch.stack([m(x) for m in members])
    _assert_equal_with_gradients(ens, members, out, expected)


class _WritesIntoItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.fc.weight.reshape(2, 6)[0, :2] = 0.0  # a member's reshape is a view of it
        return self.fc(x)


def test_a_write_through_a_reshape_of_a_parameter_is_not_fused():
    """On the stacked in-major Linear weight the reshape is a copy: the fused write was lost,
    silently. The fused path refuses it and says why."""
    ens = ve.Ensemble.from_factory(_WritesIntoItsWeight, 3, backend="fused")
    ens.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ve.FallbackWarning)
        ens(torch.randn(5, 4))
    assert "into 'fc.weight' through a reshape of it" in ens.explain()["(fused)"]


class _KeywordFrom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return h + torch.empty_like(h).uniform_(**{"from": -1.0, "to": 1.0})  # (a keyword)


def test_a_program_fx_cannot_write_is_remembered_not_built_on_every_call(monkeypatch):
    """fx writes uniform_(from=-1.0) into the program's code, which Python cannot read: the
    SyntaxError was taken for a failure of the program, which was built (and warned of)
    again on every call. It is remembered as a reason, as an untraceable forward is."""
    import vensemble.backends.fused as fused_module

    builds = []
    build = fused_module.build_program
    monkeypatch.setattr(fused_module, "build_program", lambda *a: builds.append(1) or build(*a))
    ens = ve.Ensemble.from_factory(_KeywordFrom, 3, backend="fused")
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ve.FallbackWarning)  # (vmap runs it)
        for _ in range(3):
            assert ens(x).shape == (3, 2, 4)
    assert len(builds) == 1
    assert ens.explain()["(fused)"].startswith("not used: fx could not write the program")
