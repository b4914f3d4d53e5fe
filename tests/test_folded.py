"""The folded loop: eval-mode BatchNorm folded into its convolution, member by member."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import vensemble as ve
from vensemble import ensemble as ensemble_module
from vensemble.backends._call import Call
from vensemble.backends.folded import FoldedPlan, folded_program
from vensemble.backends.loop import loop_forward

N = 3


class _Net(nn.Module):
    """Conv -> BN pairs of every dimension, with and without bias and affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm1d(4)
        self.c2 = nn.Conv2d(2, 3, 3, bias=False, padding=1, padding_mode="reflect")
        self.b2 = nn.BatchNorm2d(3, affine=False)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.b3 = nn.BatchNorm3d(2)
        self.head = nn.Linear(4 + 3 + 2, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        h1 = torch.relu(self.b1(self.c1(x1))).mean(-1)
        h2 = nn.functional.relu(self.b2(self.c2(x2))).mean((-2, -1))
        h3 = self.b3(self.c3(x3)).mean((-3, -2, -1))
        return self.head(torch.cat([h1, h2, h3], dim=-1))


def _ensemble(backend: str = "auto") -> ve.Ensemble:
    ens = ve.Ensemble.from_factory(_Net, N, backend=backend).double().eval()
    with torch.no_grad():  # distinct running statistics and affine parameters per member
        for name, t in ens.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn_like(t) * 0.3)
            elif name.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
        for name, p in ens.named_parameters():
            if name.startswith("b"):
                p.add_(torch.randn_like(p) * 0.3)
    return ens


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 2, 7), (5, 2, 6, 6), (5, 1, 3, 4, 4)]
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes)


def _call(ens: ve.Ensemble, args: tuple[torch.Tensor, ...]) -> Call:
    return Call(ens._template, N, args, {}, (None,) * len(args))


def test_folded_members_equal_the_loop_and_relu_runs_in_place():
    ens, x = _ensemble(), _inputs()
    plan = FoldedPlan()
    with torch.no_grad():
        expected = loop_forward(_call(ens, x))
        program = folded_program(_call(ens, x), plan)
        assert program is not None
        got = loop_forward(_call(ens, x), program.module)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    assert [p.name for p in program.pairs] == ["c1 -> b1", "c2 -> b2", "c3 -> b3"]
    code = program.module.code
    assert code.count("torch.relu_(") == 2, code  # after the 1-D and 2-D pairs; not after b3
    assert "b1" not in code and "c1" not in code  # the pair's modules are not called


def test_folding_follows_updated_weights_and_statistics():
    ens, x = _ensemble(), _inputs()
    plan = FoldedPlan()
    with torch.no_grad():
        program = folded_program(_call(ens, x), plan)
        assert program is not None
        loop_forward(_call(ens, x), program.module)
        ens.c2.weight.mul_(1.5)  # in place, as an optimizer step
        ens.b1.running_var.add_(0.25)
        ens.b3.bias = nn.Parameter(ens.b3.bias + 1)  # a new tensor in the slot
        again = folded_program(_call(ens, x), plan)
        assert again is program  # nothing is baked in: the same program serves
        got = loop_forward(_call(ens, x), again.module)
        expected = loop_forward(_call(ens, x))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_nothing_is_folded_with_autograd_in_training_mode_or_without_statistics():
    ens, x = _ensemble(), _inputs()
    plan = FoldedPlan()
    assert folded_program(_call(ens, x), plan) is None  # autograd on
    with torch.no_grad():
        ens.train()
        assert folded_program(_call(ens, x), plan) is None
        ens.eval()
        assert folded_program(_call(ens, x), plan) is not None
        ens.b1.train(), ens.b2.train()  # one pair still folds: it runs; the others run as is
        program = folded_program(_call(ens, x), plan)
        assert program is not None and [p.foldable() for p in program.pairs] == [0, 0, 1]
        before = {k: b.clone() for k, b in ens.named_buffers()}
        got = loop_forward(_call(ens, x), program.module)
        after = {k: b.clone() for k, b in ens.named_buffers()}
        for k in before:  # reset the training-mode statistics the folded run updated
            ens.get_buffer(k).copy_(before[k])
        expected = loop_forward(_call(ens, x))
        for k, b in ens.named_buffers():
            torch.testing.assert_close(after[k], b, atol=1e-12, rtol=1e-10, msg=k)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)

    def no_stats() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))

    plain = ve.Ensemble.from_factory(no_stats, 2).eval()
    with torch.no_grad():
        assert folded_program(Call(plain._template, 2, (torch.randn(2, 1, 5, 5),), {}, (None,)), FoldedPlan()) is None  # fmt: skip


class _Shared(nn.Module):
    """A conv whose output has two readers, and a tensor read straight off the module."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.scale = nn.Parameter(torch.ones(1))
        self.direct = direct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.direct:
            return self.bn(h) * self.scale
        return self.bn(h) + h


@pytest.mark.parametrize("direct", [False, True], ids=["conv-output-read-twice", "get-attr"])
def test_pairs_it_cannot_fold_exactly_are_left_alone(direct):
    ens = ve.Ensemble.from_factory(lambda: _Shared(direct), 2).eval()
    plan = FoldedPlan()
    with torch.no_grad():
        assert folded_program(Call(ens._template, 2, (torch.randn(2, 1, 4, 4),), {}, (None,)), plan) is None  # fmt: skip
    reason = next(iter(plan.programs.values()))
    assert isinstance(reason, str)
    assert ("attribute" in reason) if direct else ("no convolution" in reason)


def test_auto_takes_the_folded_loop_when_it_measures_fastest(monkeypatch):
    ens, x = _ensemble(), _inputs()
    loop = _ensemble("loop")
    loop.load_state_dict(ens.state_dict())
    seen: list[list[str]] = []

    def timings(paths, **kwargs):
        seen.append(list(paths))
        return {"vectorized": 3.0, "loop": 2.0, "folded": 1.0}

    monkeypatch.setattr(ensemble_module, "measure_paths", timings)
    with torch.no_grad():
        got = ens(*x)
        torch.testing.assert_close(got, loop(*x), atol=1e-12, rtol=1e-10)
        assert "folded" in ens.explain()["(auto)"] and "c1 -> b1" in ens.explain()["(auto)"]
        torch.testing.assert_close(ens(*x), got)  # the choice is remembered
    assert seen == [["vectorized", "loop", "folded"]]
    ens.train()
    monkeypatch.setattr(ensemble_module, "measure_paths", lambda paths, **kw: seen.append(list(paths)) or {k: 1.0 for k in paths})  # fmt: skip
    with torch.no_grad():
        ens(*x)
    ens.eval()
    ens(*x)  # with autograd: nothing to fold
    assert seen[1:] == [["vectorized", "loop"], ["vectorized", "loop"]]


def test_copies_start_without_programs():
    ens, x = _ensemble(), _inputs()
    with torch.no_grad():
        assert folded_program(_call(ens, x), ens._folded) is not None
    assert copy.deepcopy(ens)._folded.programs == {}
    assert pickle.loads(pickle.dumps(ens))._folded.programs == {}


class _Optional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn(self.conv(x))
        if bias is not None:  # traced without a value for bias, this branch would be baked in
            h = h + bias
        return h.mean((-2, -1))


def test_a_forward_with_optional_arguments_is_not_folded():
    ens = ve.Ensemble.from_factory(_Optional, 3).eval()
    loop = ve.Ensemble.from_factory(_Optional, 3, backend="loop").eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert folded_program(Call(ens._template, 3, (x,), {}, (None,)), ens._folded) is None
        torch.testing.assert_close(ens(x), loop(x))
    assert "optional" in next(iter(ens._folded.programs.values()))


def test_mixed_precision_pairs_run_unfolded_with_the_loops_dtype():
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def prepare(e: ve.Ensemble) -> ve.Ensemble:
        e.to(torch.bfloat16).get_submodule("1").float()  # BatchNorm kept in float32
        return e.eval()

    ens, loop = prepare(ve.Ensemble.from_factory(net, 3)), prepare(ve.Ensemble.from_factory(net, 3, backend="loop"))  # fmt: skip
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        program = folded_program(Call(ens._template, 3, (x,), {}, (None,)), FoldedPlan())
        assert program is None  # nothing folds: the pair is left as two layers
        expected = loop(x)
        for backend in ("auto", "fused"):
            ens.backend = backend
            got = ens(x)
            assert got.dtype == expected.dtype == torch.bfloat16, backend
            torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def _forced_folded(monkeypatch) -> list[list[str]]:
    measured: list[list[str]] = []

    def timings(paths, **kwargs):
        measured.append(list(paths))
        return {k: (0.1 if k == "folded" else 1.0) for k in paths}

    monkeypatch.setattr(ensemble_module, "measure_paths", timings)
    return measured


def test_an_unbatched_conv1d_input_leaves_its_batchnorm_as_the_loop_has_it(monkeypatch):
    _forced_folded(monkeypatch)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))

    ens = ve.Ensemble.from_factory(net, 3).double().eval()
    with torch.no_grad():
        for name, t in ens.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn_like(t))
    loop = ve.Ensemble.from_factory(net, 3, backend="loop").double().eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(
        2, 6, dtype=torch.float64
    )  # (C, L): the conv's output (4, 4) is (batch, C) to BN
    with torch.no_grad():
        got = ens(x)
        assert ens._last_choice[0] == "folded"
        torch.testing.assert_close(got, loop(x), atol=1e-12, rtol=1e-10)


def test_a_folded_forward_that_raises_falls_back_to_the_loop(monkeypatch):
    from vensemble.backends import folded as folded_module

    ens, x = _ensemble(), _inputs()
    loop = _ensemble("loop")
    loop.load_state_dict(ens.state_dict())
    measure = ensemble_module.measure_paths
    original = folded_module._ConvBN.forward

    def broken(*args):
        raise RuntimeError("a kernel the folded forward cannot run")

    monkeypatch.setattr(folded_module._ConvBN, "forward", broken)
    with torch.no_grad():  # in the measurement: the folded path is left out
        torch.testing.assert_close(ens(*x), loop(*x), atol=1e-12, rtol=1e-10)
        assert "folded" not in ens._last_choice[1] and ens._last_choice[1]
    assert measure is ensemble_module.measure_paths
    ens = _ensemble()
    ens.load_state_dict(loop.state_dict())
    measured = _forced_folded(monkeypatch)
    monkeypatch.setattr(folded_module._ConvBN, "forward", original)
    with torch.no_grad():
        ens(*x)
        assert ens._last_choice[0] == "folded" and len(ens._choices) == 1
        monkeypatch.setattr(torch, "rsqrt", broken)  # after the choice: only the fold uses it
        torch.testing.assert_close(ens(*x), loop(*x), atol=1e-12, rtol=1e-10)
        assert ens._choices == {}  # measured again on the next call
    assert measured == [["vectorized", "loop", "folded"]]


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_the_fused_program_folds_eval_batchnorm_without_autograd(per_member):
    ens, x = _ensemble("fused"), _inputs()
    loop = _ensemble("loop")
    loop.load_state_dict(ens.state_dict())
    if per_member:  # a different input per member
        x = tuple(torch.stack([t * (i + 1) for i in range(N)]) for t in x)
    kw = {"in_dims": 0} if per_member else {}
    with torch.no_grad():
        torch.testing.assert_close(ens(*x, **kw), loop(*x, **kw), atol=1e-12, rtol=1e-10)
    routes = ens.explain()
    assert all(
        routes[b].startswith("fused: folded into the convolution") for b in ("b1", "b2", "b3")
    )
    code = ens._fused.last.module.code
    assert code.count("torch.relu_(") == 2, code
    # with autograd the pairs run as two layers: the loop's outputs and gradients
    out, expected = ens(*x, **kw), loop(*x, **kw)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    out.sum().backward(), expected.sum().backward()
    for name, p in ens.named_parameters():
        torch.testing.assert_close(p.grad, loop.get_parameter(name).grad, msg=name)


def test_a_batchnorm_of_the_wrong_size_raises_as_in_the_loop_instead_of_broadcasting():
    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(4, 1, 3, padding=1), nn.BatchNorm2d(4))  # 1 channel, 4 stats

    x = torch.randn(5, 4, 6, 6)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="running_mean should contain 1 elements not 4"):
            ve.Ensemble.from_factory(net, 3, backend="loop").eval()(x)
        fused = ve.Ensemble.from_factory(net, 3, backend="fused").eval()
        with pytest.raises(RuntimeError, match="running_mean should contain 1 elements not 4"):
            fused(x)
        assert folded_program(Call(fused._template, 3, (x,), {}, (None,)), FoldedPlan()) is None


def test_nothing_folds_under_autocast():
    ens, x = _ensemble(), _inputs()
    ens.float()
    with torch.no_grad():
        assert folded_program(_call(ens, tuple(t.float() for t in x)), FoldedPlan()) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert folded_program(_call(ens, tuple(t.float() for t in x)), FoldedPlan()) is None


class _Block(nn.Module):
    """A residual block as torchvision writes it: in-place ReLU, a conv + BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.down(x))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        )
        self.block = _Block(4, 6, 2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((-2, -1)))


@pytest.mark.parametrize("backend", ["auto", "fused"])
def test_a_residual_network_folds_every_pair_and_equals_the_loop(backend, monkeypatch):
    _forced_folded(monkeypatch)
    ens = ve.Ensemble.from_factory(_ResNet, 3, backend=backend).double().eval()
    with torch.no_grad():
        for name, b in ens.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    loop = ve.Ensemble.from_factory(_ResNet, 3, backend="loop").double().eval()
    loop.load_state_dict(ens.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    xs = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop(x), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(ens(xs, in_dims=0), loop(xs, in_dims=0), atol=1e-12, rtol=1e-10)
    pairs = ["stem.1", "block.bn1", "block.bn2", "block.down.1"]
    if backend == "auto":
        assert ens._last_choice[0] == "folded"
        assert len(ens._folded.last.pairs) == len(pairs)
    else:
        assert all(ens.explain()[p].startswith("fused: folded") for p in pairs)
