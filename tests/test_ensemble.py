"""Ensemble against the loop oracle: every backend, the zoo, dtypes, member counts, inputs."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import vensemble as ve
from _helpers import ZOO, Recurrent, assert_tree_close, zoo_input

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _members(name: str, n: int, dtype: torch.dtype, train: bool) -> list[nn.Module]:
    factory = ZOO[name][0]
    members = []
    for i in range(n):
        torch.manual_seed(100 + i)
        members.append(factory().to(dtype).train(train))
    return members


def _run(ens: ve.Ensemble, *args, **kwargs):
    if ens.backend in ("auto", "fused") and type(ens._template) is Recurrent and not ens.explain():
        with pytest.warns(ve.FallbackWarning, match="'rnn' \\(LSTM\\)"):
            return ens(*args, **kwargs)
    return ens(*args, **kwargs)


# vmap has no LSTM batching rule (test_vmap_backend_names_the_culprit covers that case), and
# dropout in train mode draws other masks than the loop by design (test_dropout_* cover it).
CASES = [
    pytest.param(backend, name, train, id=f"{backend}-{name}-{'train' if train else 'eval'}")
    for backend in ("loop", "vmap", "fused", "auto")
    for name in ZOO
    for train in (False, True)
    if not (backend == "vmap" and name == "lstm") and not (train and name == "dropout")
]


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per_member"])
@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("backend", "name", "train"), CASES)
def test_outputs_gradients_and_buffers_equal_the_members(
    backend, name, train, dtype, n, per_member
):
    members = _members(name, n, dtype, train)
    sources = copy.deepcopy(members)
    ens = ve.Ensemble(members, backend=backend)
    if per_member:
        xs = torch.stack([zoo_input(name, 4, dtype) for _ in range(n)])
        out = _run(ens, xs, in_dims=0)
        expected = torch.stack([m(x) for m, x in zip(sources, xs)])
    else:
        x = zoo_input(name, 4, dtype)
        out = _run(ens, x)
        expected = torch.stack([m(x) for m in sources])
    atol = TOL[dtype]
    if backend == "fused":
        assert "(fused)" not in ens.explain(), ens.explain()  # the fused program ran
    assert out.shape == (n, *expected.shape[1:])
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-5)

    weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for key, p in ens.named_parameters():
        want = torch.stack([s.get_parameter(key).grad for s in sources])
        torch.testing.assert_close(p.grad, want, atol=atol, rtol=1e-5, msg=f"grad of {key}")
    for key, b in ens.named_buffers():
        want = torch.stack([s.get_buffer(key) for s in sources])
        torch.testing.assert_close(b, want, atol=atol, rtol=1e-5, msg=f"buffer {key}")
    for src, orig in zip(members, sources):  # the ensemble copied: sources untouched, no grads
        for (k, p), (_, q) in zip(src.named_parameters(), orig.named_parameters()):
            assert p.grad is None and torch.equal(p, q), k


def test_fused_backend_is_auto_for_now():
    members = _members("mlp", 3, torch.float32, False)
    x = torch.randn(5, 6)
    out = ve.Ensemble(members, backend="fused")(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]), atol=1e-5, rtol=1e-5)


def test_from_factory_member_i_is_factory_under_seed_plus_i():
    state = torch.get_rng_state()
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 5, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "from_factory must not move the global RNG"
    for i in range(5):
        torch.manual_seed(7 + i)
        ref = nn.Linear(4, 3)
        torch.testing.assert_close(ens.member(i).weight, ref.weight, atol=0, rtol=0)
        torch.testing.assert_close(ens.member(i).bias, ref.bias, atol=0, rtol=0)


def test_member_unstack_select_and_indexing():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 5)
    assert len(ens) == 5 and ens.num_members == 5
    w = ens.state_dict()["weight"]
    assert w.shape == (5, 3, 4)
    m = ens.member(2)
    assert isinstance(m, nn.Linear) and torch.equal(m.weight, w[2])
    assert torch.equal(ens[-1].weight, w[4])
    assert [torch.equal(u.weight, w[i]) for i, u in enumerate(ens.unstack())] == [True] * 5
    assert [torch.equal(u.weight, w[i]) for i, u in enumerate(ens)] == [True] * 5
    sub = ens.select([3, 0])
    assert isinstance(sub, ve.Ensemble) and len(sub) == 2
    assert torch.equal(sub.state_dict()["weight"], w[[3, 0]])
    sl = ens[1:4]
    assert len(sl) == 3 and torch.equal(sl.state_dict()["bias"], ens.state_dict()["bias"][1:4])
    m.weight.data.zero_()  # a member is a copy
    assert not torch.equal(ens.state_dict()["weight"][2], m.weight)
    with pytest.raises(
        ve.EnsembleError, match="member index 5 is out of range for an ensemble of 5"
    ):
        ens.member(5)
    with pytest.raises(ve.EnsembleError, match="non-empty"):
        ens.select([])
    # any integer, as a list takes: numpy's, a 0-d integer tensor (val_loss.argmin())
    for i in (np.int64(3), torch.tensor(3), torch.tensor([1.0, 0.5, 2.0, -1.0, 4.0]).argmin()):
        assert torch.equal(ens.member(i).weight, w[3]) and torch.equal(ens[i].weight, w[3])
    for bad in (1.0, True, torch.tensor(1.0), "1"):
        with pytest.raises(ve.EnsembleError, match="member index must be an int"):
            ens.member(bad)


def test_state_dict_round_trip_and_shape_errors():
    a = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 3, seed=0)
    b = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 3, seed=10)
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, atol=0, rtol=0)
    x = torch.randn(2, 4)  # each ensemble picks its own fastest path: equal up to rounding
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-6)
    c = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 5)
    with pytest.raises(
        ve.EnsembleError, match=r"state_dict\['weight'\] has shape \(3, 3, 4\).*\(5, 3, 4\)"
    ):
        c.load_state_dict(a.state_dict())


def test_parameters_are_the_stacked_leaves_and_an_optimizer_trains_them():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 1), 3)
    params = list(ens.parameters())
    assert [p.shape for p in params] == [(3, 1, 4), (3, 1)]
    assert all(p.is_leaf and p.requires_grad for p in params)
    before = ens.state_dict()["weight"].clone()
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    ens(torch.randn(8, 4)).pow(2).mean(dim=(1, 2)).sum().backward()
    opt.step()
    assert not torch.allclose(before, ens.state_dict()["weight"])


def test_to_dtype_and_train_eval_propagate():
    ens = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 2)
    ens.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in ens.parameters())
    assert ens(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64
    ens.eval()
    assert not ens.training and not ens.member(0).training and not ens.member(0)[1].training
    ens.train()
    assert ens.member(1)[1].training


def test_batchnorm_running_stats_are_per_member_and_carried_out():
    ens = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 3)
    xs = torch.randn(3, 16, 4) * torch.tensor([1.0, 3.0, 10.0]).view(3, 1, 1)
    ens(xs, in_dims=0)
    means = ens.state_dict()["1.running_mean"]
    assert not torch.allclose(means[0], means[1])
    for i, m in enumerate(ens.unstack()):
        assert torch.equal(m[1].running_mean, means[i])
        assert int(m[1].num_batches_tracked) == 1


def test_dropout_masks_are_independent_per_member_and_reproducible():
    def factory() -> nn.Module:
        torch.manual_seed(0)  # identical members: any difference comes from the masks
        return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5))

    for backend in ("auto", "vmap", "loop"):
        ens = ve.Ensemble.from_factory(factory, 4, backend=backend)
        x = torch.randn(5, 8)
        torch.manual_seed(1)
        a = ens(x)
        torch.manual_seed(1)
        b = ens(x)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        masks = a == 0
        assert all(not torch.equal(masks[0], masks[i]) for i in range(1, 4)), backend
        ens.eval()
        out = ens(x)
        torch.testing.assert_close(out[0], out[3], atol=0, rtol=0)


def test_randomness_same_gives_every_member_the_same_mask():
    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5))

    for backend in ("vmap", "loop"):
        out = ve.Ensemble.from_factory(factory, 3, backend=backend, randomness="same")(
            torch.randn(5, 8)
        )
        torch.testing.assert_close(out[0], out[2], atol=0, rtol=0)


def test_tied_weights_stay_tied_in_the_ensemble_and_its_members():
    from _helpers import Tied

    ens = ve.Ensemble.from_factory(Tied, 3)
    sd = ens.state_dict()
    assert torch.equal(sd["emb.weight"], sd["out.weight"])
    assert len(list(ens.parameters())) == 3  # emb/out weight once, mix weight and bias
    m = ens.member(1)
    assert m.out.weight is m.emb.weight
    with torch.no_grad():
        ens.get_parameter("emb.weight").add_(1.0)
    assert torch.equal(ens.state_dict()["out.weight"], ens.state_dict()["emb.weight"])


def test_transformer_eval_under_no_grad_uses_a_path_vmap_can_batch():
    members = _members("transformer", 3, torch.float32, train=False)
    x = zoo_input("transformer", 2, torch.float32)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members])
        for backend in ("vmap", "auto"):
            out = ve.Ensemble(members, backend=backend)(x)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled(), "the fast-path switch must be restored"


def test_vmap_backend_names_the_culprit_and_points_to_auto():
    ens = ve.Ensemble.from_factory(Recurrent, 2, backend="vmap")
    with pytest.raises(
        ve.EnsembleError, match=r"cannot run submodule 'rnn' \(LSTM\).*lstm.*backend='auto'"
    ):
        ens(torch.randn(3, 5, 4))


def test_auto_warns_once_and_explains_the_fallback():
    ens = ve.Ensemble.from_factory(Recurrent, 2)
    x = torch.randn(3, 5, 4)
    with pytest.warns(ve.FallbackWarning, match="Batching rule not implemented for aten::lstm"):
        ens(x)
    ens(x)  # no second warning (warnings are errors in this suite)
    how = ens.explain()
    assert how["rnn"].startswith("per-member loop") and "aten::lstm" in how["rnn"], how
    assert how["proj"].startswith("fused") and how["head"].startswith("fused"), how
    vmap_only = ve.Ensemble.from_factory(Recurrent, 2, chunk_size=1)  # chunking: the vmap path
    with pytest.warns(ve.FallbackWarning, match="'rnn'"):
        vmap_only(x)
    assert list(vmap_only.explain()) == ["(auto)", "rnn"]


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc(x)
        h = self.bn(z)
        # data-dependent control flow in the model's own forward, on a sum well away from 0
        # (the batch-normalised h sums to 0 up to rounding: its sign would be a coin toss)
        if z.sum() > 0:
            return h
        return -h


class _SparseLookup(nn.Module):
    """A sparse-gradient embedding in a forward fx cannot trace (but vmap can run)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, sparse=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        if x.dim() == 1:  # control flow on a shape: vmap runs it, fx does not
            h = h * 2
        return self.head(h)


def test_vmap_backend_refuses_a_sparse_embedding_under_autograd_before_running():
    # torch.vmap runs it, then its backward fails far from the cause (reshape of a sparse grad)
    ens = ve.Ensemble.from_factory(_SparseLookup, 3, backend="vmap")
    x = torch.randint(0, 7, (5,))
    with pytest.raises(ve.EnsembleError, match=r"submodule 'emb' \(Embedding\).*sparse"):
        ens(x)
    with torch.no_grad():  # no gradient, nothing to refuse
        expected = torch.stack([m(x) for m in ens.unstack()])
        torch.testing.assert_close(ens(x), expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_auto_loops_a_sparse_embedding_vmap_cannot_differentiate(chunk_size):
    ens = ve.Ensemble.from_factory(_SparseLookup, 3, chunk_size=chunk_size).double()
    members = ens.unstack()
    x = torch.randint(0, 7, (5,))
    with pytest.warns(ve.FallbackWarning, match="sparse"):
        out = ens(x)
    expected = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert ens.emb.weight.grad.is_sparse
    want = torch.stack([m.emb.weight.grad.to_dense() for m in members])
    torch.testing.assert_close(ens.emb.weight.grad.to_dense(), want, atol=1e-12, rtol=0)
    for key in ("head.weight", "head.bias"):
        want = torch.stack([m.get_parameter(key).grad for m in members])
        torch.testing.assert_close(ens.get_parameter(key).grad, want, atol=1e-12, rtol=0)
    looped = "emb" if chunk_size is None else "(whole model)"  # chunks split every table
    assert ens.explain()[looped].startswith("per-member loop"), ens.explain()


def test_auto_loops_a_model_with_data_dependent_control_flow_without_double_updates():
    members = [_Branchy() for _ in range(3)]
    sources = copy.deepcopy(members)
    ens = ve.Ensemble(members)
    x = torch.randn(6, 4)
    with pytest.warns(ve.FallbackWarning, match="the model's forward"):
        out = ens(x)
    expected = torch.stack([m(x) for m in sources])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for i, m in enumerate(ens.unstack()):  # the failed vmap attempts were undone
        torch.testing.assert_close(m.bn.running_mean, sources[i].bn.running_mean, atol=1e-7, rtol=0)
        assert int(m.bn.num_batches_tracked) == 1


def test_a_genuine_model_error_is_raised_unchanged_and_not_treated_as_fallback():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 2)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        ens(torch.randn(3, 5))
    assert ens.explain() == {"Linear": ens.explain()["Linear"]}, "no fallback was recorded"
    assert ens.explain()["Linear"].startswith("fused")
    strict = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 2, backend="vmap")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        strict(torch.randn(3, 5))


@pytest.mark.parametrize("backend", ["auto", "vmap", "loop"])
def test_chunk_size_gives_the_same_answer(backend):
    full = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 7, backend=backend)
    chunked = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 7, backend=backend, chunk_size=3)
    x = torch.randn(5, 4)
    torch.testing.assert_close(chunked(x), full(x), atol=1e-6, rtol=1e-5)


def test_nan_in_one_member_stays_in_that_member():
    ens = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), 4
    )
    with torch.no_grad():
        ens.get_parameter("0.weight")[2, 0, 0] = float("nan")
    for backend in ("auto", "vmap", "loop"):
        ens.backend = backend
        out = ens(torch.randn(3, 4))
        assert torch.isnan(out[2]).any() and torch.isfinite(out[[0, 1, 3]]).all(), backend


class _Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 4)

    def forward(self, x: Tensor, y: Tensor, *, scale: float = 1.0, mask: Tensor | None = None):
        h = self.a(x) * scale
        if mask is not None:
            h = h * mask
        return {"a": h, "pair": (self.b(y), h.sum(-1))}


@pytest.mark.parametrize("backend", ["auto", "vmap", "loop"])
def test_kwargs_mixed_in_dims_and_structured_outputs(backend):
    members = [_Structured() for _ in range(3)]
    ens = ve.Ensemble(members, backend=backend)
    xs, y, mask = torch.randn(3, 5, 3), torch.randn(5, 3), torch.ones(5, 2)
    out = ens(xs, y, in_dims=(0, None), scale=2.0, mask=mask)
    ref = [m(x, y, scale=2.0, mask=mask) for m, x in zip(members, xs)]
    expected = {
        "a": torch.stack([r["a"] for r in ref]),
        "pair": (
            torch.stack([r["pair"][0] for r in ref]),
            torch.stack([r["pair"][1] for r in ref]),
        ),
    }
    assert_tree_close(out, expected, atol=1e-6)


def test_in_dims_errors_name_both_sizes():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 3)
    with pytest.raises(
        ve.EnsembleError, match=r"argument 0 has size 5 at dim 0.*ensemble has 3 members"
    ):
        ens(torch.randn(5, 2, 4), in_dims=0)
    with pytest.raises(ve.EnsembleError, match="in_dims has 2 entries but 1 positional"):
        ens(torch.randn(3, 2, 4), in_dims=(0, None))
    with pytest.raises(ve.EnsembleError, match="only 2 dims"):
        ens(torch.randn(3, 4), in_dims=2)


def test_ensemble_nests_inside_a_larger_model():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(4, 4)
            self.heads = ve.Ensemble.from_factory(lambda: nn.Linear(4, 2), 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.heads(self.trunk(x))

    model = Head()
    assert set(model.state_dict()) == {"trunk.weight", "trunk.bias", "heads.weight", "heads.bias"}
    other = Head()
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(other(x), model(x), atol=1e-6, rtol=1e-6)
    assert model(x).shape == (3, 2, 2)


def test_bad_options_raise():
    with pytest.raises(ve.EnsembleError, match="backend must be one of"):
        ve.Ensemble([nn.Linear(2, 2)], backend="jax")
    with pytest.raises(ve.EnsembleError, match="randomness must be one of"):
        ve.Ensemble([nn.Linear(2, 2)], randomness="sometimes")
    with pytest.raises(ve.EnsembleError, match="chunk_size must be a positive int"):
        ve.Ensemble([nn.Linear(2, 2)], chunk_size=0)
    with pytest.raises(ve.EnsembleError, match="n must be a positive int"):
        ve.Ensemble.from_factory(lambda: nn.Linear(2, 2), 0)


class _NoVmapRule(torch.autograd.Function):
    """A straight-through sign: its backward is not the derivative of its forward."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.sign(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return _NoVmapRule.apply(self.fc(x))


def test_when_neither_fused_nor_vmap_can_run_the_model_auto_loops_it():
    members = [_Opaque() for _ in range(3)]
    ens = ve.Ensemble(copy.deepcopy(members))
    x = torch.randn(5, 4)
    with pytest.warns(ve.FallbackWarning, match="vmap cannot run the model's forward"):
        out = ens(x)
    expected = torch.stack([m(x) for m in members])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    how = ens.explain()
    assert "custom autograd.Function" in how["(fused)"] and "(whole model)" in how, how
    out.pow(3).sum().backward()
    expected.pow(3).sum().backward()  # the custom backward (identity), not sign's zero derivative
    torch.testing.assert_close(
        ens.get_parameter("fc.weight").grad, torch.stack([m.fc.weight.grad for m in members])
    )


class _NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.target = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            t = self.target(x)
        return self.fc(x) - t


def test_grad_mode_blocks_in_the_forward_are_honoured():
    members = [_NoGradInside() for _ in range(3)]
    ens = ve.Ensemble(copy.deepcopy(members))
    x = torch.randn(5, 4)
    ens(x).sum().backward()
    assert ens.get_parameter("target.weight").grad is None
    assert "grad mode" in ens.explain()["(fused)"]


def test_forward_hooks_are_run_so_the_members_run_one_by_one():
    members = [nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)]
    for m in members:
        m[0].register_forward_hook(lambda mod, inp, out: out * 10)
    ens = ve.Ensemble(copy.deepcopy(members))
    x = torch.randn(5, 4)
    torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]), atol=1e-6, rtol=1e-5)
    assert "hooks are registered" in ens.explain()[""]


def test_parametrized_layers_run_per_member():
    from torch.nn.utils.parametrizations import weight_norm

    members = [nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.Tanh()) for _ in range(3)]
    ens = ve.Ensemble(copy.deepcopy(members))
    x = torch.randn(5, 4)
    with warnings.catch_warnings():  # torch warns that _weight_norm has no batching rule
        warnings.simplefilter("ignore", UserWarning)
        out = ens(x)
    torch.testing.assert_close(out, torch.stack([m(x) for m in members]), atol=1e-6, rtol=1e-5)
    assert ens.explain()["0"] == "vmap"  # not the fused Linear: it would norm the stacked weight


def test_auto_measures_once_per_shape_and_restores_what_measuring_changed():
    ens = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2)), 3
    )
    twin = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2)), 3
    )
    twin.backend = ens.backend = "auto"
    x = torch.randn(6, 4)
    torch.manual_seed(5)
    ens(x)  # measures, then runs the chosen path once
    path = ens.explain()["(auto)"].split()[0]
    assert path in ("vectorized", "loop")
    twin.backend = "loop" if path == "loop" else "fused"
    torch.manual_seed(5)
    twin(x)  # the same path without measuring: same RNG draws, same single BatchNorm update
    for key, value in ens.state_dict().items():
        torch.testing.assert_close(value, twin.state_dict()[key], msg=key)
    ens(torch.randn(6, 4))
    ens(torch.randn(9, 4))  # a new batch size: measured once more
    assert len(ens._choices) == 2


def test_auto_times_nothing_under_deterministic_algorithms(deterministic, monkeypatch):
    """Timed choices agree only up to rounding; deterministic mode makes them fixed rules."""
    import vensemble.backends._autotune as autotune
    import vensemble.ensemble as ensemble_module

    def no_timing(*args, **kwargs):
        raise AssertionError("timed a choice under torch.use_deterministic_algorithms(True)")

    monkeypatch.setattr(ensemble_module, "measure_paths", no_timing)
    monkeypatch.setattr(autotune, "_time", no_timing)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))

    ens = ve.Ensemble.from_factory(net, 3, seed=0)
    fused = ve.Ensemble.from_factory(net, 3, seed=0, backend="fused")
    x = torch.randn(2, 3, 8, 8)
    out = ens(x)
    assert ens.explain()["(auto)"].startswith("vectorized (deterministic algorithms")
    torch.testing.assert_close(out, fused(x), atol=0, rtol=0)
    torch.testing.assert_close(out, ve.Ensemble.from_factory(net, 3, seed=0)(x), atol=0, rtol=0)
    loop = ve.Ensemble.from_factory(net, 3, seed=0, backend="loop")
    torch.testing.assert_close(out, loop(x), atol=1e-5, rtol=1e-5)  # the reference, to rounding


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.register_buffer("scale", torch.rand(5) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return (self.lin(x) * self.scale).tanh().sum(-1)


@pytest.mark.parametrize("transform", ["grad", "jacrev", "functional_call"])
def test_auto_inside_a_torch_func_transform_measures_nothing(transform):
    """auto's first call inside torch.func.grad raised: putting the buffers back after a
    timed run writes into tensors the transform captured. Inside a transform nothing is
    measured (the vectorized path runs), as under a trace; a plain call measures later."""
    torch.manual_seed(0)
    members = [_Scaled().double() for _ in range(3)]
    ens = ve.Ensemble(copy.deepcopy(members), backend="auto")
    loop = ve.Ensemble(copy.deepcopy(members), backend="loop")
    x = torch.randn(4, 5, dtype=torch.float64)

    def run(model: nn.Module) -> Any:
        if transform == "grad":
            return torch.func.grad(lambda x: model(x).sum())(x)
        if transform == "jacrev":
            return torch.func.jacrev(model)(x)
        params = dict(model.named_parameters())
        return torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).sum())(params)

    torch.testing.assert_close(run(ens), run(loop), atol=1e-12, rtol=0)
    assert "torch.func transform" in ens.explain()["(auto)"]
    assert len(ens._choices) == 0  # nothing remembered: a plain call measures
    torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=0)
    assert ens.explain()["(auto)"].split(" (")[1].startswith("measured per call")
    torch.testing.assert_close(run(ens), run(loop), atol=1e-12, rtol=0)  # (the choice kept)


def test_a_path_that_raises_in_a_timed_run_leaves_nothing_behind():
    """auto's measurement undoes every run's side effects: an optional path (the loop, a
    rewrite) that raises in a timed run, after its warm-up went through, is left out; any
    other path's error propagates, with the model's state and the RNG put back first."""
    from vensemble.backends._autotune import measure_paths

    state = {"written": 0}

    def restore() -> None:
        state["written"] = 0

    def path(fails_on: int | None) -> Callable[[], None]:
        runs = [0]

        def run() -> None:
            runs[0] += 1
            state["written"] += 1  # a side effect (a BatchNorm's running stats)
            torch.rand(3)  # a draw
            if runs[0] == fails_on:
                raise RuntimeError("boom")

        return run

    torch.manual_seed(0)
    rng = torch.get_rng_state()
    paths = {"vectorized": path(None), "loop": path(2), "native": path(4)}
    timings = measure_paths(paths, restore=restore, device=None, optional=frozenset({"loop", "native"}))  # fmt: skip
    assert set(timings) == {"vectorized"}  # each optional path raised in a timed run
    assert all(0 < t < math.inf for t in timings.values())
    assert state["written"] == 0
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(RuntimeError, match="boom"):
        measure_paths({"vectorized": path(3)}, restore=restore, device=None)
    assert state["written"] == 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_auto_with_compile_times_the_compiled_program_against_the_loop(monkeypatch):
    """compile=True must not leave a model slower than the loop: the compiled path is timed."""
    import vensemble.ensemble as ensemble_module

    measure = ensemble_module.measure_paths
    calls: list[dict] = []

    def spy(paths, **kwargs):
        timings = measure(paths, **kwargs)
        calls.append({"warmups": kwargs.get("warmups"), "compiled": ens._fused.last.compiled})
        # as if the loop were faster than the program, compiled or not
        return {**timings, "vectorized": 2.0, "eager": 2.0, "loop": 1.0}

    monkeypatch.setattr(ensemble_module, "measure_paths", spy)
    ens = ve.Ensemble.from_factory(
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh()), 3, compile=True
    )
    loop = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(4, 8), nn.Tanh()), 3, backend="loop")  # fmt: skip
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x), atol=0, rtol=0)  # the loop ran
    assert calls == [{"warmups": {"vectorized": 3}, "compiled": calls[0]["compiled"]}]
    assert calls[0]["compiled"] is not None  # the compiled program was built before timing
    assert ens.explain()["(auto)"].startswith("loop (measured per call")


class _DoublesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x.mul_(2)  # in place, on the caller's tensor
        return self.fc(x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_auto_measures_a_forward_that_modifies_its_input_without_modifying_it_per_run(grad):
    # the timed runs each doubled the caller's tensor (x came back 2**25 times larger, and the
    # output with it); with gradients the loop's autograd raised (each member doubles what the
    # last one saved), and that error came out of the measurement
    members = [_DoublesItsInput().double() for _ in range(3)]
    sources = copy.deepcopy(members)
    ens = ve.Ensemble(members)
    x = torch.randn(5, 4, dtype=torch.float64)
    x0 = x.clone()
    with torch.set_grad_enabled(grad):
        out = ens(x)
    torch.testing.assert_close(x, 2 * x0, atol=0, rtol=0)  # doubled once, as by one member
    expected = torch.stack([m(x0.clone()) for m in sources])  # each member alone
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    if grad:
        out.square().sum().backward()
        expected.square().sum().backward()
        for key, p in ens.named_parameters():
            want = torch.stack([m.get_parameter(key).grad for m in sources])
            torch.testing.assert_close(p.grad, want, atol=1e-12, rtol=0, msg=key)
        assert "loop raised" in ens.explain()["(auto)"]


@pytest.mark.parametrize("backend", ["auto", "fused", "vmap", "loop"])
def test_inputs_made_in_inference_mode_give_the_members_result(backend):
    # an inference tensor has no version counter (reading it raised in every vectorized path)
    members = [nn.Linear(4, 3).double() for _ in range(3)]
    ens = ve.Ensemble(copy.deepcopy(members), backend=backend)
    with torch.inference_mode():
        x = torch.randn(5, 4, dtype=torch.float64)
        expected = torch.stack([m(x) for m in members])
        torch.testing.assert_close(ens(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", ["auto", "fused", "vmap"])  # (the loop doubles it per member)
def test_an_inference_input_modified_in_place_is_modified_once(backend):
    members = [_DoublesItsInput().double() for _ in range(3)]
    sources = copy.deepcopy(members)
    ens = ve.Ensemble(members, backend=backend)
    with torch.inference_mode():
        x = torch.randn(5, 4, dtype=torch.float64)
        x0 = x.clone()
        out = ens(x)  # auto: measured, the input doubled once, not once per timed run
        torch.testing.assert_close(x, 2 * x0, atol=0, rtol=0)
        expected = torch.stack([m(x0.clone()) for m in sources])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_auto_measurement_leaves_inputs_it_did_not_modify_untouched():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 3)
    x = torch.randn(5, 4)
    version = x._version
    ens(x)
    assert x._version == version  # no write-back where nothing was modified


def test_input_keeper_writes_back_only_what_was_modified():
    from vensemble.backends._call import Call

    a, b = torch.randn(3), torch.randn(3)
    call = Call(nn.Linear(1, 1), 1, (a,), {"b": b, "k": 1}, (None,))
    before_a, version_b = a.clone(), b._version
    put_back = call.input_keeper()
    a.add_(1)
    put_back()
    torch.testing.assert_close(a, before_a, atol=0, rtol=0)
    assert b._version == version_b
    a.mul_(3)  # again after a write-back: still noticed
    put_back()
    torch.testing.assert_close(a, before_a, atol=0, rtol=0)


def test_nothing_is_timed_or_remembered_while_make_fx_traces(monkeypatch):
    """A trace would record every timed run (and time fake kernels): the first candidate is
    taken, and no choice is remembered for the calls after it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import vensemble.backends._autotune as autotune
    import vensemble.ensemble as ensemble_module

    def no_timing(*args, **kwargs):
        raise AssertionError("timed a choice while tracing")

    monkeypatch.setattr(ensemble_module, "measure_paths", no_timing)
    monkeypatch.setattr(autotune, "_time", no_timing)
    ens = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 2)), 3)
    x = torch.randn(20, 8)
    before = autotune.choices()
    with torch.no_grad():
        graph = make_fx(ens)(x)
    assert autotune.choices() == before
    assert not ens._choices
    assert "not measured" in ens.explain()["(auto)"]
    matmuls = [n for n in graph.graph.nodes if "bmm" in str(n.target) or "mm" in str(n.target)]
    assert len(matmuls) == 2  # one per layer: no timed runs recorded
    with torch.no_grad():
        expected = torch.stack([m(x) for m in ens.unstack()])
    torch.testing.assert_close(graph(x), expected, atol=1e-6, rtol=1e-6)
    assert all(not layer._columns for layer in ens.modules() if hasattr(layer, "_columns"))


def test_nothing_is_measured_under_a_dispatch_mode():
    """FlopCounterMode (a dispatch mode, as make_fx's and fake tensors' are) would count the
    timed runs' flops too."""
    from torch.utils.flop_counter import FlopCounterMode

    from vensemble.backends._autotune import measuring_allowed

    assert measuring_allowed()
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(64, 4), 3)
    x = torch.randn(50, 64)
    with FlopCounterMode(display=False) as counter:
        assert not measuring_allowed()
        with torch.no_grad():
            ens(x)
    assert measuring_allowed()
    assert counter.get_total_flops() == 2 * 3 * 50 * 64 * 4  # one GEMM's, none timed


def test_under_a_dispatch_mode_a_choice_measured_before_is_kept_and_no_new_one_remembered():
    from torch.utils.flop_counter import FlopCounterMode

    from vensemble.backends import _autotune

    ran = []
    candidates = {"first": lambda: ran.append("first"), "second": lambda: ran.append("second")}
    measured, fresh = ("test-kept", 1), ("test-kept", 2)
    _autotune._CACHE[measured] = "second"
    try:
        with FlopCounterMode(display=False):
            assert _autotune.autotune(measured, candidates, torch.device("cpu")) == "second"
            assert _autotune.autotune(fresh, candidates, torch.device("cpu")) == "first"
        assert not ran  # nothing timed
        assert fresh not in _autotune.choices()
    finally:
        _autotune._CACHE.pop(measured, None)


def test_make_fx_records_the_path_auto_measured_before(monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    import vensemble.ensemble as ensemble_module

    monkeypatch.setattr(ensemble_module, "_loop_wins", lambda *args: True)  # the loop, measured
    ens = ve.Ensemble.from_factory(lambda: nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 2)), 3)
    x = torch.randn(20, 8)
    with torch.no_grad():
        ens(x)
        assert ens.explain()["(auto)"].startswith("loop (measured")
        graph = make_fx(ens)(x)
    matmuls = [n for n in graph.graph.nodes if "mm" in str(n.target)]
    assert len(matmuls) == 3 * 2  # each member's two layers: the loop, as measured


def test_auto_measures_an_ensemble_built_under_inference_mode():
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())

    with torch.inference_mode():  # (its buffers are inference tensors)
        ens = ve.Ensemble.from_factory(net, 3).eval()
        loop = ve.Ensemble.from_factory(net, 3, backend="loop").eval()
        loop.load_state_dict(ens.state_dict())
    x = torch.randn(5, 4)
    with torch.no_grad():  # auto's measurement puts the buffers back: within inference mode
        torch.testing.assert_close(ens(x), loop(x))


def test_a_path_far_behind_in_one_noisy_run_is_timed_again(monkeypatch):
    """One run 3x behind the best dropped a path: another process taking the cores for one
    run made auto keep a path 6.6x slower for good."""
    import vensemble.backends._autotune as autotune

    times = {  # seconds of each timed run, in order; warm-ups are not timed
        "spiked": iter([15.0, 0.06, 0.05, 0.07, 0.06, 0.06]),
        "steady": iter([0.1] * 6),
        "slow": iter([10.0] * 6),
        "behind the new best": iter([0.25] * 6),  # (within 3x of 0.1, not of 0.06)
    }
    timed: list[str] = []

    def fake_time(fn, device, repeats):
        name = fn()
        timed.append(name)
        return next(times[name])

    monkeypatch.setattr(autotune, "_time", fake_time)
    paths = {name: (lambda name=name: name) for name in times}
    timings = autotune.measure_paths(paths, restore=lambda: None, device=None, repeats=5)
    assert timings == {"spiked": 0.05, "steady": 0.1, "slow": 10.0, "behind the new best": 0.25}
    # far behind in a run and in the second look: out after that
    assert timed.count("slow") == timed.count("behind the new best") == 2
    assert timed.count("spiked") == 6 and timed.count("steady") == 5
