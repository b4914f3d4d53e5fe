"""MemberReduceLROnPlateau: each member's rate as torch's ReduceLROnPlateau on it alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vensemble as ve


def _alone_lrs(metrics: torch.Tensor, lr: float, **options) -> list[float]:
    """torch's scheduler over one member's optimizer, stepped with its metrics: its rates."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **options)
    out = []
    for m in metrics.tolist():
        sched.step(m)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize(
    "options",
    [
        {"patience": 1, "factor": 0.5},
        {"patience": 0, "factor": 0.3, "cooldown": 2, "min_lr": [0.01, 0.0, 0.02]},
        {"mode": "max", "patience": 1, "threshold": 0.1, "threshold_mode": "abs"},
    ],
    ids=["plain", "cooldown-min_lr", "max-abs"],
)
def test_each_member_follows_torchs_scheduler_on_its_own_metric(options):
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(3, 1), 3, seed=0)
    lrs = [0.1, 0.2, 0.05]
    opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=lrs, groups="member")
    sched = ve.MemberReduceLROnPlateau(opt, **options)
    gen = torch.Generator().manual_seed(0)
    metrics = torch.rand(12, 3, generator=gen, dtype=torch.float64).cumsum(0) * torch.tensor(
        [-1.0, 0.2, 1.0], dtype=torch.float64
    )  # one member improving steadily, one slowly, one getting worse
    got = []
    for row in metrics:
        sched.step(row)
        got.append(opt.member_lr.tolist())
    for i in range(3):
        own = dict(options)
        if isinstance(own.get("min_lr"), list):
            own["min_lr"] = own["min_lr"][i]
        want = _alone_lrs(metrics[:, i], lrs[i], **own)
        assert [r[i] for r in got] == pytest.approx(want, rel=0, abs=0), i
    assert len({tuple(r) for r in got}) > 1  # the rates did move, and apart
    assert sched.get_last_lr() == got[-1]


def test_an_inactive_member_keeps_its_scheduler_state():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(3, 1), 2, seed=0)
    opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=0.1, groups="member")
    sched = ve.MemberReduceLROnPlateau(opt, patience=0, factor=0.5)
    sched.step(torch.tensor([1.0, 1.0]))
    sched.step(torch.tensor([2.0, 2.0]), active=torch.tensor([True, False]))
    assert opt.member_lr.tolist() == [0.05, 0.1]
    assert sched.schedulers[1].last_epoch == 1 and sched.schedulers[0].last_epoch == 2


def test_state_dict_round_trip_continues_as_uninterrupted():
    def run(split: bool) -> list[float]:
        ens = ve.Ensemble.from_factory(lambda: nn.Linear(3, 1), 2, seed=0)
        opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=[0.1, 0.3], groups="member")
        sched = ve.MemberReduceLROnPlateau(opt, patience=1, factor=0.5, cooldown=1)
        rows = torch.tensor([[3.0, 1.0], [2.0, 1.5], [2.5, 1.6], [2.6, 0.5], [2.7, 0.6]] * 2)
        for k, row in enumerate(rows):
            if split and k == 5:  # a new optimizer and scheduler, loaded from the states
                opt_sd, sched_sd = opt.state_dict(), sched.state_dict()
                opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=[0.1, 0.3], groups="member")
                opt.load_state_dict(opt_sd)
                sched = ve.MemberReduceLROnPlateau(opt, patience=1, factor=0.5, cooldown=1)
                sched.load_state_dict(sched_sd)
            sched.step(row)
        return opt.member_lr.tolist()

    assert run(split=True) == run(split=False)
    assert run(split=False) != [0.1, 0.3]


def test_refuses_what_it_cannot_schedule_per_member():
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(3, 1), 3, seed=0)
    shared = ve.MemberOptimizer(torch.optim.SGD, ens, lr=0.1)
    with pytest.raises(ve.EnsembleError, match="groups='member'"):
        ve.MemberReduceLROnPlateau(shared)
    with pytest.raises(ve.EnsembleError, match="MemberOptimizer"):
        ve.MemberReduceLROnPlateau(torch.optim.SGD(ens.parameters(), lr=0.1))  # type: ignore[arg-type]
    per_member = ve.MemberOptimizer(torch.optim.SGD, ens, lr=0.1, groups="member")
    with pytest.raises(ve.EnsembleError, match="min_lr has 2 values but the ensemble has 3"):
        ve.MemberReduceLROnPlateau(per_member, min_lr=[0.0, 0.1])
    sched = ve.MemberReduceLROnPlateau(per_member)
    with pytest.raises(ve.EnsembleError, match="got 2 metrics for 3 members"):
        sched.step([1.0, 2.0])
    with pytest.raises(ValueError, match=r"Factor should be < 1\.0"):
        ve.MemberReduceLROnPlateau(per_member, factor=1.0)


def test_fit_steps_each_members_scheduler_with_its_own_validation_loss():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=gen, dtype=torch.float64)
    xv = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    yv = xv @ torch.randn(4, 1, generator=gen, dtype=torch.float64)  # another map: plateaus
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 1), 3, seed=0).double()
    lrs = [0.3, 0.03, 0.003]
    opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=lrs, groups="member")
    sched = ve.MemberReduceLROnPlateau(opt, patience=1, factor=0.5)
    h = ve.fit(
        ens, (x, y), nn.MSELoss(), optimizer=opt, scheduler=sched, epochs=8,
        batch_size=16, val_data=(xv, yv), progress=False,
    )  # fmt: skip
    for i in range(3):
        want = [lrs[i], *_alone_lrs(h.val_loss[:-1, i], lrs[i], patience=1, factor=0.5)]
        assert h.lr[:, i].tolist() == pytest.approx(want, rel=1e-12), i
    assert len({tuple(r) for r in h.lr.T.tolist()}) == 3
    assert any(h.lr[-1, i] < lrs[i] for i in range(3))  # some member's rate was cut
