"""MemberOptimizer and clip_grad_norm_ against members trained alone with plain torch."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble.train import MemberOptimizer, clip_grad_norm_, member_loss

STEPS = 20


class BNNet(nn.Module):
    """A small MLP with BatchNorm, trained in train mode (batch statistics, running stats).

    fc1 has no bias, as usual before BatchNorm: BatchNorm subtracts the batch mean, so such a
    bias's true gradient is 0 and its computed gradient is rounding noise (~1e-9), which Adam
    and RMSprop normalise into steps of size lr: no two implementations would agree on it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16, bias=False)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _member_kwargs(hp: dict[str, Any], i: int) -> dict[str, Any]:
    """Member i's own hyperparameters from a MemberOptimizer-style dict."""
    out = {}
    for k, v in hp.items():
        if isinstance(v, list):
            out[k] = v[i]
        elif isinstance(v, Tensor) and v.ndim >= 1:
            out[k] = v[i].item()
        else:
            out[k] = v
    return out


def _train_both(
    opt_cls: type[torch.optim.Optimizer],
    hp: dict[str, Any],
    n: int,
    *,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    schedule: Callable[[torch.optim.Optimizer, int | None], Any] | None = None,
    groups: str = "auto",
    per_member_inputs: bool = False,
    steps: int = STEPS,
) -> tuple[ve.Ensemble, list[nn.Module], list[Tensor], list[list[Tensor]]]:
    """Train an ensemble and, separately, its members alone; the same data, step by step."""
    ens = ve.Ensemble.from_factory(BNNet, n, seed=0)
    alone = ens.unstack()  # copies taken BEFORE training: the standalone members
    opt = MemberOptimizer(opt_cls, ens, groups=groups, **hp)
    sched = schedule(opt, None) if schedule else None
    opts = [opt_cls(m.parameters(), **_member_kwargs(hp, i)) for i, m in enumerate(alone)]
    scheds = [schedule(o, i) for i, o in enumerate(opts)] if schedule else []
    g = torch.Generator().manual_seed(1)
    norms_ens: list[Tensor] = []
    norms_alone: list[list[Tensor]] = []
    for _ in range(steps):
        xs = torch.randn(n if per_member_inputs else 1, 16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        out = ens(xs, in_dims=0) if per_member_inputs else ens(xs[0])
        opt.zero_grad()
        member_loss(F.cross_entropy, out, y).sum().backward()
        if max_norm is not None:
            norms_ens.append(clip_grad_norm_(ens, max_norm, norm_type))
        opt.step()
        if sched:
            sched.step()
        step_norms = []
        for i, (m, o) in enumerate(zip(alone, opts)):
            o.zero_grad()
            F.cross_entropy(m(xs[i if per_member_inputs else 0]), y).backward()
            if max_norm is not None:
                step_norms.append(
                    torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm, norm_type)
                )
            o.step()
            if scheds:
                scheds[i].step()
        norms_alone.append(step_norms)
    return ens, alone, norms_ens, norms_alone


def _assert_members_equal(ens: ve.Ensemble, alone: list[nn.Module]) -> None:
    for i, m in enumerate(alone):
        got = ens.member(i).state_dict()
        want = m.state_dict()
        assert got.keys() == want.keys()
        for k in want:  # weights AND buffers (BatchNorm running stats, num_batches_tracked)
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"member {i} {k}")


LRS5 = [0.05, 0.05, 0.02, 0.02, 0.1]  # runs (0, 2), (2, 4), (4, 5)
WD5 = [0.0, 0.0, 0.01, 0.01, 0.01]

CASES = {
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd_momentum_per_member": (
        torch.optim.SGD,
        {"lr": LRS5, "momentum": 0.9, "weight_decay": WD5},
    ),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd_nesterov_per_member": (
        torch.optim.SGD,
        {"lr": torch.tensor(LRS5), "momentum": 0.8, "nesterov": True, "weight_decay": WD5},
    ),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam_per_member": (
        torch.optim.Adam,
        {"lr": [x / 5 for x in LRS5], "weight_decay": WD5, "amsgrad": True},
    ),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "adamw_per_member": (
        torch.optim.AdamW,
        {"lr": [x / 5 for x in LRS5], "weight_decay": [0.1, 0.1, 0.0, 0.3, 0.3]},
    ),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.5, "centered": True}),
    "rmsprop_per_member": (
        torch.optim.RMSprop,
        {"lr": [x / 10 for x in LRS5], "weight_decay": WD5, "alpha": 0.9},
    ),
    "adam_per_member_betas": (
        torch.optim.Adam,
        {"lr": 0.01, "betas": [(0.9, 0.999)] * 2 + [(0.8, 0.99)] * 2 + [(0.5, 0.9)]},
    ),
    "adagrad_per_member": (torch.optim.Adagrad, {"lr": LRS5}),
    # torch's Adagrad fills its state from the constructor's value, not each group's
    "adagrad_per_member_initial_accumulator": (
        torch.optim.Adagrad,
        {"lr": 0.05, "initial_accumulator_value": [0.0, 0.5, 0.5, 1.0, 2.0]},
    ),
    "adagrad_equal_initial_accumulator_list": (
        torch.optim.Adagrad,
        {"lr": LRS5, "initial_accumulator_value": [0.5] * 5},
    ),
}


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_separate_training(case, n):
    opt_cls, hp = CASES[case]
    hp = {k: (v[:n] if isinstance(v, (list, Tensor)) else v) for k, v in hp.items()}
    ens, alone, _, _ = _train_both(opt_cls, hp, n)
    _assert_members_equal(ens, alone)


def test_per_member_inputs_and_member_groups_equal_separate_training():
    hp = {"lr": 0.01, "weight_decay": 0.01}
    ens, alone, _, _ = _train_both(
        torch.optim.AdamW, hp, 3, groups="member", per_member_inputs=True
    )
    _assert_members_equal(ens, alone)


def test_a_non_elementwise_optimizer_gets_one_group_per_member():
    # Adafactor factors each 2-D parameter's second moment by rows and columns: exact only
    # when every member's parameter is its own tensor.
    ens, alone, _, _ = _train_both(torch.optim.Adafactor, {"lr": 0.01}, 3)
    _assert_members_equal(ens, alone)


def test_groups_are_runs_of_equal_hyperparameters():
    ens = ve.Ensemble.from_factory(BNNet, 5, seed=0)
    opt = MemberOptimizer(torch.optim.AdamW, ens, lr=LRS5, weight_decay=0.01)
    assert [g["members"] for g in opt.param_groups] == [range(0, 2), range(2, 4), range(4, 5)]
    assert opt.member_lr.tolist() == LRS5
    assert opt.member_values("weight_decay") == [0.01] * 5
    shared = MemberOptimizer(torch.optim.Adam, ens, lr=0.01)
    assert len(shared.param_groups) == 1 and shared.param_groups[0]["fused"] is True
    # in-major Linear weights are seen through their contiguous permutation (same storage):
    weight, bias = shared.param_groups[0]["params"][:2]
    stacked_weight, stacked_bias = list(ens.parameters())[:2]
    assert weight.is_contiguous() and weight.data_ptr() == stacked_weight.data_ptr()
    assert torch.equal(weight, stacked_weight.permute(0, 2, 1))
    assert bias.data_ptr() == stacked_bias.data_ptr() and bias.shape == stacked_bias.shape
    plain = ve.Ensemble.from_factory(lambda: torch.nn.Conv1d(2, 3, 3), 4)
    only = MemberOptimizer(torch.optim.Adam, plain, lr=0.01)
    assert only.param_groups[0]["params"] == list(plain.parameters()) and not only._links
    member = MemberOptimizer(torch.optim.Adam, ens, lr=0.01, groups="member")
    assert [g["members"] for g in member.param_groups] == [range(i, i + 1) for i in range(5)]
    same = MemberOptimizer(torch.optim.SGD, ens, lr=[0.5] * 5, momentum=[0.9] * 5)
    assert len(same.param_groups) == 1  # a per-member list of equal values is that value
    assert same.param_groups[0]["lr"] == 0.5 and same.param_groups[0]["momentum"] == 0.9
    assert same.member_lr.tolist() == [0.5] * 5


@pytest.mark.parametrize(("norm_type", "max_norm"), [(2.0, 0.7), (1.0, 6.0), (math.inf, 0.2)])
def test_per_member_clipping_equals_clipping_each_member(norm_type, max_norm):
    # max_norm near the members' median norm: some members are clipped, others are not
    ens, alone, norms_ens, norms_alone = _train_both(
        torch.optim.SGD, {"lr": LRS5, "momentum": 0.9}, 5, max_norm=max_norm, norm_type=norm_type
    )
    _assert_members_equal(ens, alone)
    clipped = 0
    for got, want in zip(norms_ens, norms_alone):
        torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
        clipped += int((got > max_norm).sum())
    assert 10 < clipped < 5 * STEPS - 10


def test_clip_returns_norms_and_handles_missing_grads():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(2, 1), 3, seed=0)
    assert torch.equal(clip_grad_norm_(ens, 1.0), torch.zeros(3))
    ens.weight.grad = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]], [[0.0, 0.0]]])
    norms = clip_grad_norm_(ens, 1.0)  # bias has no grad: skipped, as in torch
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5, 0.0]))
    torch.testing.assert_close(ens.weight.grad[0], torch.tensor([[0.6, 0.8]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ens.weight.grad[1], torch.tensor([[0.3, 0.4]]))
    for foreach in (None, True, False):  # torch's keyword, for drop-in use
        torch.testing.assert_close(
            clip_grad_norm_(ens, 1.0, foreach=foreach), torch.tensor([1.0, 0.5, 0.0])
        )
    ens.weight.grad[2, 0, 0] = float("nan")
    with pytest.raises(ve.EnsembleError, match=r"member\(s\) \[2\]"):
        clip_grad_norm_(ens, 1.0, error_if_nonfinite=True)


def _lambda(i: int | None) -> Any:
    if i is None:
        return [lambda e, k=k: 0.9 ** (e * (k + 1)) for k in range(3)]
    return lambda e: 0.9 ** (e * (i + 1))


SCHEDULES = {
    "step": lambda o, i: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "cosine": lambda o, i: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    "lambda_per_member": lambda o, i: torch.optim.lr_scheduler.LambdaLR(o, _lambda(i)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedulers_equal_separate_training(name):
    hp = {"lr": [0.05, 0.02, 0.1], "momentum": 0.9}
    groups = "member" if name == "lambda_per_member" else "auto"
    ens, alone, _, _ = _train_both(torch.optim.SGD, hp, 3, schedule=SCHEDULES[name], groups=groups)
    _assert_members_equal(ens, alone)


def test_per_member_lambda_schedule_sets_each_members_lr():
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=0.1, groups="member")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lambda(None))
    for _ in range(2):
        opt.step()
        sched.step()
    torch.testing.assert_close(
        opt.member_lr, torch.tensor([0.1 * 0.9**2, 0.1 * 0.9**4, 0.1 * 0.9**6], dtype=torch.float64)
    )


def test_state_dict_round_trip_continues_identically(deterministic):
    hp = {"lr": [0.01, 0.02, 0.01], "weight_decay": 0.01}
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    opt = MemberOptimizer(torch.optim.AdamW, ens, **hp)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def step(e: ve.Ensemble, o: MemberOptimizer) -> None:
        o.zero_grad()
        member_loss(F.cross_entropy, e(x), y).sum().backward()
        o.step()

    for _ in range(5):
        step(ens, opt)
    buf = io.BytesIO()
    torch.save({"ens": ens.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    copy = ve.Ensemble.from_factory(BNNet, 3, seed=7)
    copy.load_state_dict(saved["ens"])
    copy_opt = MemberOptimizer(torch.optim.AdamW, copy, **hp)
    copy_opt.load_state_dict(saved["opt"])
    for _ in range(5):
        step(ens, opt)
        step(copy, copy_opt)
    for k, v in ens.state_dict().items():
        torch.testing.assert_close(copy.state_dict()[k], v, atol=0, rtol=0)
    # a scheduler built before loading still drives the loaded optimizer
    sched = torch.optim.lr_scheduler.StepLR(copy_opt, step_size=1, gamma=0.5)
    copy_opt.load_state_dict(saved["opt"])
    copy_opt.step()
    sched.step()
    assert copy_opt.member_lr.tolist() == [0.005, 0.01, 0.005]
    assert copy_opt.optimizer.param_groups[0]["lr"] == 0.005
    other = MemberOptimizer(torch.optim.AdamW, copy, lr=0.01)
    with pytest.raises(ve.EnsembleError, match="param groups cover members"):
        other.load_state_dict(saved["opt"])


def test_zero_grad_and_closure():
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=[0.1, 0.2, 0.3])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = member_loss(F.cross_entropy, ens(x), y).sum()
        loss.backward()
        return loss

    before = [p.detach().clone() for p in ens.parameters()]
    loss = opt.step(closure)
    assert loss.ndim == 0
    assert all(not torch.equal(a, p) for a, p in zip(before, ens.parameters()))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ens.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in ens.parameters())


def test_bad_hyperparameters_name_the_culprit():
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    with pytest.raises(ve.EnsembleError, match=r"'lr' has 2 values .* 3 members"):
        MemberOptimizer(torch.optim.Adam, ens, lr=[0.1, 0.2])
    with pytest.raises(ve.EnsembleError, match=r"'weight_decay' has 4 values .* 3 members"):
        MemberOptimizer(torch.optim.Adam, ens, weight_decay=torch.zeros(4))
    with pytest.raises(ve.EnsembleError, match=r"'betas' has 2 values .* 3 members"):
        MemberOptimizer(torch.optim.Adam, ens, betas=[(0.9, 0.99), (0.9, 0.99)])
    with pytest.raises(ve.EnsembleError, match=r"member 2's hyperparameters \(lr=-0.1\)"):
        MemberOptimizer(torch.optim.SGD, ens, lr=[0.1, 0.1, -0.1])
    with pytest.raises(ve.EnsembleError, match="has no hyperparameter 'mommentum'"):
        MemberOptimizer(torch.optim.SGD, ens, lr=0.1, mommentum=0.9)
    with pytest.raises(ve.EnsembleError, match="LBFGS"):
        MemberOptimizer(torch.optim.LBFGS, ens)
    with pytest.raises(ve.EnsembleError, match="Optimizer subclass"):
        MemberOptimizer(nn.Linear, ens)  # type: ignore[arg-type]
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=0.1)
    with pytest.raises(ve.EnsembleError, match="fixed"):
        opt.add_param_group({"params": [torch.zeros(1)]})


def test_betas_tuple_is_one_value_for_all_members():
    ens = ve.Ensemble.from_factory(BNNet, 2, seed=0)
    opt = MemberOptimizer(torch.optim.Adam, ens, betas=(0.8, 0.9))  # N == len(betas)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_step_hooks_and_the_profiler_range_work_as_for_any_optimizer():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    opt = MemberOptimizer(torch.optim.AdamW, ens, lr=[0.01, 0.02, 0.01])
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    calls: list[str] = []

    def step() -> None:
        opt.zero_grad()
        member_loss(F.cross_entropy, ens(x), y).sum().backward()
        opt.step()

    step()  # no hooks, no profiler: the light path
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    glob = register_optimizer_step_pre_hook(
        lambda o, args, kwargs: calls.append("global") if o is opt else None
    )
    try:
        before = ens.get_parameter("fc2.bias").detach().clone()
        step()
        assert calls == ["global", "pre", "post"]
        assert not torch.equal(before, ens.get_parameter("fc2.bias"))  # and it stepped
    finally:
        pre.remove(), post.remove(), glob.remove()
    calls.clear()
    step()
    assert calls == []
    with torch.profiler.profile() as prof:
        step()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#MemberOptimizer.step" in names


def _mlp3() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _step_each_alone(
    alone: list[nn.Module],
    opts: list[torch.optim.Optimizer],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    **forward_kwargs: Any,
) -> None:
    """One plain-torch step of each member alone on ``loss_fn(member(x), y)``."""
    for m, o in zip(alone, opts):
        o.zero_grad()
        loss_fn(m(x, **forward_kwargs), y).backward()
        o.step()


def _max_diff_to_alone(ens: ve.Ensemble, alone: list[nn.Module]) -> float:
    return max(
        (ens.member(i).state_dict()[k] - v).abs().max().item()
        for i, m in enumerate(alone)
        for k, v in m.state_dict().items()
    )


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.SGD])
def test_gradients_set_by_hand_in_another_layout_train_as_alone(opt_cls):
    """torch.autograd.grad gives contiguous gradients; the in-major Linear weights are not.
    The fused kernels read a parameter and its gradient in one order: relaid out first."""
    ens = ve.Ensemble.from_factory(_mlp3, 3, seed=0, backend="loop")
    alone = ens.unstack()
    hp: dict[str, Any] = {"lr": 1e-2, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {})}
    opt = MemberOptimizer(opt_cls, ens, **hp)
    opts = [opt_cls(m.parameters(), **hp) for m in alone]
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    for _ in range(3):
        params = list(ens.parameters())
        grads = torch.autograd.grad(member_loss(F.mse_loss, ens(x), y).sum(), params)
        assert any(g.stride() != p.stride() for p, g in zip(params, grads))  # (the case)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        _step_each_alone(alone, opts, F.mse_loss, x, y)
    assert _max_diff_to_alone(ens, alone) < 1e-6


def test_parameters_replaced_after_the_optimizer_is_built_are_trained():
    """vector_to_parameters swaps each parameter's .data: the optimizer's per-member views
    follow; a dtype change is refused with the parameter named."""
    ens = ve.Ensemble.from_factory(_mlp3, 2, seed=0)
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=0.1)
    flat = torch.cat([p.detach().reshape(-1) for p in ens.parameters()])
    torch.nn.utils.vector_to_parameters(flat + 1.0, ens.parameters())
    before = [p.detach().clone() for p in ens.parameters()]
    x = torch.randn(5, 4)
    ens(x).sum().backward()
    opt.step()
    for b, p in zip(before, ens.parameters()):
        assert p.grad is not None
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad, atol=1e-6, rtol=1e-6)
    ens.double()
    opt.zero_grad()
    ens(x.double()).sum().backward()
    with pytest.raises(ve.EnsembleError, match=r"parameter \d .*float32.*float64.*build the"):
        opt.step()


def test_grad_scaler_unscales_and_steps_as_for_members_alone():
    """GradScaler.unscale_ reads the param groups' gradients before step(): the per-member
    views get theirs as soon as backward accumulates them."""
    ens = ve.Ensemble.from_factory(_mlp3, 2, seed=0, backend="loop")
    alone = ens.unstack()
    opt = MemberOptimizer(torch.optim.Adam, ens, lr=[1e-2, 1e-3])
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(alone, [1e-2, 1e-3])]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in alone]
    for _ in range(3):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        opt.zero_grad()
        scaler.scale(member_loss(F.cross_entropy, ens(x), y).sum()).backward()
        scaler.unscale_(opt)
        clip_grad_norm_(ens, 1.0)
        scaler.step(opt)
        scaler.update()
        for m, o, s in zip(alone, opts, scalers):
            o.zero_grad()
            s.scale(F.cross_entropy(m(x), y)).backward()
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            s.step(o)
            s.update()
    assert _max_diff_to_alone(ens, alone) < 1e-6


def test_sparse_gradients_get_torchs_own_kernel_choice():
    """Embedding(sparse=True): fused and foreach kernels refuse sparse gradients."""

    def make() -> nn.Module:
        return nn.Embedding(10, 3, sparse=True)

    ens = ve.Ensemble.from_factory(make, 2, seed=0, backend="loop")
    alone = ens.unstack()
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=0.5)
    idx = torch.tensor([1, 2, 2, 7])
    ens(idx).sum().backward()
    opt.step()
    for m in alone:
        o = torch.optim.SGD(m.parameters(), lr=0.5)
        m(idx).sum().backward()
        o.step()
    assert _max_diff_to_alone(ens, alone) < 1e-6


def test_a_member_optimizer_saves_and_resumes_with_the_ensemble(tmp_path):
    ens = ve.Ensemble.from_factory(_mlp3, 3, seed=0)
    twin = ve.Ensemble.from_factory(_mlp3, 3, seed=0)
    opt = MemberOptimizer(torch.optim.Adam, ens, lr=[1e-2, 1e-3, 3e-3])
    twin_opt = MemberOptimizer(torch.optim.Adam, twin, lr=[1e-2, 1e-3, 3e-3])
    x = torch.randn(8, 4)

    def steps(e: ve.Ensemble, o: MemberOptimizer, k: int) -> None:
        for _ in range(k):
            o.zero_grad()
            e(x).square().sum().backward()
            o.step()

    steps(ens, opt, 3)
    ve.save(ens, tmp_path / "c.safetensors", optimizer=opt)
    resumed = ve.Ensemble.from_factory(_mlp3, 3, seed=5)
    resumed_opt = MemberOptimizer(torch.optim.Adam, resumed, lr=[1e-2, 1e-3, 3e-3])
    ve.load(tmp_path / "c.safetensors", resumed, optimizer=resumed_opt)
    steps(resumed, resumed_opt, 3)
    steps(twin, twin_opt, 6)
    for a, b in zip(resumed.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_muon_takes_per_member_hyperparameters():
    # each member's values were checked on a 1-D stand-in, which Muon (2-D only) refused
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))

    ens = ve.Ensemble.from_factory(net, 2, seed=0)
    alone = ens.unstack()
    lrs = [0.02, 0.01]
    opt = MemberOptimizer(torch.optim.Muon, ens, lr=lrs)
    opts = [torch.optim.Muon(m.parameters(), lr=lr) for m, lr in zip(alone, lrs)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        member_loss(F.cross_entropy, ens(x), y).sum().backward()
        opt.step()
        _step_each_alone(alone, opts, F.cross_entropy, x, y)
    for i, m in enumerate(alone):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(ens.member(i).state_dict()[k], v, msg=f"{i} {k}")


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.h1 = nn.Linear(8, 3)
        self.h2 = nn.Linear(8, 3)

    def forward(self, x: Tensor, head: int = 1) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.h1(h) if head == 1 else self.h2(h)


@pytest.mark.parametrize("lr", [0.05, [0.05, 0.02]], ids=["shared", "per-member"])
def test_sgd_momentum_trains_a_head_first_used_later_as_alone(lr):
    # torch's fused SGD (MemberOptimizer's kernel) failed on a step where some parameters had
    # momentum buffers and others none yet ("expected Tensor as element 2")
    ens = ve.Ensemble.from_factory(_TwoHeads, 2, seed=0)
    alone = ens.unstack()
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=lr, momentum=0.9)
    lrs = lr if isinstance(lr, list) else [lr] * 2
    opts = [torch.optim.SGD(m.parameters(), lr=r, momentum=0.9) for m, r in zip(alone, lrs)]
    g = torch.Generator().manual_seed(0)
    for head in (1, 2, 1, 2):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        member_loss(F.cross_entropy, ens(x, head=head), y).sum().backward()
        opt.step()
        _step_each_alone(alone, opts, F.cross_entropy, x, y, head=head)
    for i, m in enumerate(alone):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(ens.member(i).state_dict()[k], v, msg=f"{i} {k}")
    assert all(g.get("fused") for g in opt.param_groups)  # back on the fused kernel


def _square_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))  # square: no shape error


def _mse_step(ens: ve.Ensemble, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    member_loss(F.mse_loss, ens(x), y).sum().backward()
    opt.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_parameters_replaced_in_another_layout_mid_training_train_as_alone(opt_cls):
    # vector_to_parameters gives the member's own layout: the state, made over the in-major
    # one, was then paired with the wrong elements by the fused kernels (0.05-0.30 off)
    hp = {"lr": 0.05, "momentum": 0.9} if opt_cls is torch.optim.SGD else {"lr": 0.01}
    ens = ve.Ensemble.from_factory(_square_mlp, 2, seed=0).double()
    alone = ens.unstack()
    opt = MemberOptimizer(opt_cls, ens, **hp)
    opts = [opt_cls(m.parameters(), **hp) for m in alone]
    g = torch.Generator().manual_seed(1)
    for t in range(5):
        if t == 2:
            flat = torch.cat([p.detach().reshape(-1) for p in ens.parameters()])
            torch.nn.utils.vector_to_parameters(flat, ens.parameters())
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, 4, generator=g, dtype=torch.float64)
        _mse_step(ens, opt, x, y)
        _step_each_alone(alone, opts, F.mse_loss, x, y)
    assert _max_diff_to_alone(ens, alone) < 1e-12


def test_optimizer_state_loads_into_an_ensemble_in_another_layout():
    # saved over in-major weights, loaded into an ensemble given the member's own layout by
    # load_state_dict(assign=True): square weights' momentum came back transposed, silently
    def make() -> tuple[ve.Ensemble, MemberOptimizer]:
        ens = ve.Ensemble.from_factory(_square_mlp, 2, seed=0).double()
        return ens, MemberOptimizer(torch.optim.SGD, ens, lr=0.1, momentum=0.9)

    ref, ref_opt = make()
    ens, opt = make()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 8, 4, generator=g, dtype=torch.float64) for _ in range(6)]
    for t, (x, y) in enumerate(data):
        _mse_step(ref, ref_opt, x, y)
        if t < 3:
            _mse_step(ens, opt, x, y)
    resumed, _ = make()
    own = {k: v.contiguous().clone() for k, v in ens.state_dict().items()}  # the member layout
    resumed.load_state_dict(own, assign=True)
    assert resumed.get_parameter("0.weight").is_contiguous()  # the member's own layout
    resumed_opt = MemberOptimizer(torch.optim.SGD, resumed, lr=0.1, momentum=0.9)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (as from a file)
    for x, y in data[3:]:
        _mse_step(resumed, resumed_opt, x, y)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-12, rtol=0, msg=key)
    # and back: saved over the member layout, loaded over in-major weights
    again, again_opt = make()
    again.load_state_dict(resumed.state_dict())
    again_opt.load_state_dict(copy.deepcopy(resumed_opt.state_dict()))
    for x, y in data[3:]:
        _mse_step(again, again_opt, x, y)
        _mse_step(resumed, resumed_opt, x, y)
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=1e-12, rtol=0, msg=key)


def test_optimizer_state_of_another_shape_is_refused():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 3), 2, seed=0)
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=0.1, momentum=0.9)
    _mse_step(ens, opt, torch.randn(5, 4), torch.randn(5, 3))
    sd = opt.state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(2, 2, 6)  # as many elements, laid out so
    fresh = MemberOptimizer(torch.optim.SGD, ens, lr=0.1, momentum=0.9)
    with pytest.raises(ve.EnsembleError, match=r"'momentum_buffer' for parameter 0 has shape"):
        fresh.load_state_dict(sd)


def test_state_dict_hooks_run_as_on_any_optimizer():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(3, 2), 2, seed=0)
    opt = MemberOptimizer(torch.optim.Adam, ens, lr=[0.1, 0.2])
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 7})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: (
            seen.append(f"load-pre {sd.get('tag')}") or {k: v for k, v in sd.items() if k != "tag"}
        )
    )
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    sd = opt.state_dict()
    assert sd["tag"] == 7  # the post hook's result is what is returned
    opt.load_state_dict(sd)
    assert seen == ["pre", "load-pre 7", "load-post"]


@pytest.mark.parametrize("groups", ["auto", "member"])
def test_factored_optimizer_state_round_trips(groups):
    # Adafactor's row and column statistics have the parameter's dims, not its shape: the
    # layout check took them for misshapen moments and refused the state dict
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

    def run(split: bool) -> dict[str, Tensor]:
        ens = ve.Ensemble.from_factory(net, 3, seed=0)
        opt = MemberOptimizer(torch.optim.Adafactor, ens, lr=1e-2, groups=groups)
        g = torch.Generator().manual_seed(0)
        for t in range(4):
            if split and t == 2:
                sd = copy.deepcopy(opt.state_dict())
                opt = MemberOptimizer(torch.optim.Adafactor, ens, lr=1e-2, groups=groups)
                opt.load_state_dict(sd)
            x = torch.randn(8, 6, generator=g)
            opt.zero_grad()
            ens(x).pow(2).mean(dim=(1, 2)).sum().backward()
            opt.step()
        return ens.state_dict()

    whole, resumed = run(False), run(True)
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize(
    ("opt_cls", "kwargs"),
    [
        (torch.optim.SGD, {"lr": [0.1, 0.2], "momentum": 0.0}),
        (torch.optim.Adagrad, {"lr": [0.1, 0.2]}),
        (torch.optim.SGD, {"lr": 0.1, "groups": "member"}),
    ],
    ids=["sgd-per-member-lr", "adagrad-per-member-lr", "sgd-groups-member"],
)
@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")  # (torch's)
def test_sparse_gradients_with_per_member_hyperparameters(opt_cls, kwargs):
    """A sparse Embedding's gradient, sliced per member (it raised: no strided view of a
    sparse tensor), with gradients accumulated over two backward passes per step."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))

    ens = ve.Ensemble.from_factory(make, 2, seed=0).double()
    members = [copy.deepcopy(m) for m in ens.unstack()]
    opt = ve.MemberOptimizer(opt_cls, ens, **kwargs)
    lrs = kwargs["lr"] if isinstance(kwargs["lr"], list) else [kwargs["lr"]] * 2
    references = [opt_cls(m.parameters(), lr=lr) for m, lr in zip(members, lrs)]
    torch.manual_seed(0)
    for _ in range(3):
        batches = [torch.randint(0, 10, (6, 2)) for _ in range(2)]
        opt.zero_grad()
        for idx in batches:
            ens(idx).pow(2).mean(dim=(1, 2)).sum().backward()
        opt.step()
        for m, ref in zip(members, references):
            ref.zero_grad()
            for idx in batches:
                m(idx).pow(2).mean().backward()
            ref.step()
    for i, m in enumerate(members):
        for (k, a), b in zip(ens.member(i).state_dict().items(), m.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=k)
