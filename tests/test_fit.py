"""member_loss, per-member data and fit: against the loop and members trained alone."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vensemble as ve
from vensemble import FallbackWarning
from vensemble._data import MemberBatches
from vensemble.train import History, MemberOptimizer, fit, member_loss

from test_optim import BNNet  # isort: skip


def _data(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes, learnable
    return x, y


def _dropout_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _states_equal(a: nn.Module, b: nn.Module, atol: float = 0.0) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=atol, msg=k)


# ----------------------------------------------------------------------------- member_loss


def _loop(loss_fn, outputs: Tensor, targets: Tensor, per_member: bool) -> Tensor:
    return torch.stack(
        [loss_fn(outputs[i], targets[i] if per_member else targets) for i in range(len(outputs))]
    )


def _float_targets(shape: tuple[int, ...]) -> Tensor:
    return torch.rand(shape)


LOSSES = {
    "cross_entropy": (F.cross_entropy, "class"),
    "ce_module_smoothing_ignore": (
        nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=2),
        "class",
    ),
    "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), "class"),
    "ce_weighted": (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])), "class"),
    "nll": (nn.NLLLoss(ignore_index=0), "class"),
    "mse": (F.mse_loss, "regression"),
    "huber": (nn.HuberLoss(delta=0.3), "regression"),
    "bce_logits_pos_weight": (
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 0.5, 1.0])),
        "binary",
    ),
    "custom": (lambda o, y: (o - y).abs().pow(1.5).mean(), "regression"),
}


@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_member_loss_equals_the_loop(name, per_member):
    loss_fn, kind = LOSSES[name]
    n, b = 5, 7
    outputs = torch.randn(n, b, 3, requires_grad=True)
    lead = (n, b) if per_member else (b,)
    if kind == "class":
        targets = torch.randint(0, 3, lead)
    elif kind == "binary":
        targets = _float_targets((*lead, 3))
    else:
        targets = torch.randn(*lead, 3)
    got = member_loss(loss_fn, outputs, targets)
    want = _loop(loss_fn, outputs, targets, per_member)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    (g_got,) = torch.autograd.grad(got.sum(), outputs)
    (g_want,) = torch.autograd.grad(want.sum(), outputs)
    torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-6)


def test_member_loss_probability_targets_and_spatial_outputs():
    outputs = torch.randn(3, 4, 5, 2, 2)  # (N, B, C, H, W)
    probs = torch.rand(4, 5, 2, 2).softmax(dim=1)
    classes = torch.randint(0, 5, (3, 4, 2, 2))
    for targets in (probs, classes):
        got = member_loss(F.cross_entropy, outputs, targets)
        want = _loop(F.cross_entropy, outputs, targets, targets.ndim == 5 or targets is classes)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_sum_of_member_losses_gives_each_member_its_own_gradient():
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    alone = ens.unstack()
    x, y = _data(16)
    member_loss(F.cross_entropy, ens(x), y).sum().backward()
    for i, m in enumerate(alone):
        F.cross_entropy(m(x), y).backward()
        for (name, p), q in zip(m.named_parameters(), ens.parameters()):
            torch.testing.assert_close(q.grad[i], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_member_loss_rejects_mismatched_targets():
    outputs = torch.randn(3, 8, 10)
    with pytest.raises(
        ve.EnsembleError, match=r"targets of shape \(7,\).*outputs of shape \(3, 8, 10\)"
    ):
        member_loss(F.cross_entropy, outputs, torch.zeros(7, dtype=torch.long))
    with pytest.raises(ve.EnsembleError, match=r"\(4, 8\).*\(3, 8, 10\)"):
        member_loss(F.cross_entropy, outputs, torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ve.EnsembleError, match="per_member_targets=True"):
        member_loss(
            F.cross_entropy, outputs, torch.zeros(8, dtype=torch.long), per_member_targets=True
        )
    with pytest.raises(ve.EnsembleError, match="one number per member"):
        member_loss(
            nn.CrossEntropyLoss(reduction="none"), outputs, torch.zeros(8, dtype=torch.long)
        )
    square = torch.randn(4, 4, 4)  # N == B: (4, 4) targets could be either layout
    with pytest.raises(ve.EnsembleError, match="pass per_member_targets"):
        member_loss(F.mse_loss, square, torch.randn(4, 4))
    torch.testing.assert_close(
        member_loss(F.mse_loss, square, square[0], per_member_targets=False),
        _loop(F.mse_loss, square, square[0], False),
    )


def test_a_loss_vmap_cannot_run_falls_back_to_the_loop():
    def nonbatchable(o: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(o, y) + 0 * float(o.sum())  # .item()-like: no vmap rule

    outputs, targets = torch.randn(3, 4, 2), torch.randint(0, 2, (4,))
    with pytest.warns(FallbackWarning, match="nonbatchable"):
        got = member_loss(nonbatchable, outputs, targets)
    torch.testing.assert_close(got, _loop(F.cross_entropy, outputs, targets, False))


# ----------------------------------------------------------------------------- data modes


@pytest.mark.parametrize("mode", ["shuffle", "bootstrap"])
def test_member_batches_differ_per_member_and_repeat_under_a_seed(mode):
    def draws(seed: int) -> tuple[Tensor, Tensor | None]:
        b = MemberBatches(mode, 20, 3, 8, torch.Generator().manual_seed(seed))
        return torch.cat(list(b.epoch()), dim=1), b.bootstrap

    seen, boot = draws(0)
    assert seen.shape == (3, 20)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    again, boot_again = draws(0)
    assert torch.equal(seen, again)
    assert not torch.equal(seen, draws(1)[0])
    if mode == "shuffle":
        assert all(torch.equal(row.sort().values, torch.arange(20)) for row in seen)
    else:
        assert boot is not None and boot_again is not None and torch.equal(boot, boot_again)
        assert all(torch.equal(row.sort().values, b.sort().values) for row, b in zip(seen, boot))
        assert any(len(row.unique()) < 20 for row in boot)  # drawn with replacement


def test_fit_bootstrap_indices_differ_per_member_and_repeat_under_the_same_seed():
    x, y = _data()

    def run(seed: int) -> Tensor:
        ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
        h = fit(
            ens, (x, y), F.cross_entropy, epochs=1, data_mode="bootstrap", seed=seed, progress=False
        )
        assert h.bootstrap_indices is not None
        return h.bootstrap_indices

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 48) and int(a.min()) >= 0 and int(a.max()) < 48
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["shared", "shuffle", "bootstrap"])
def test_fit_equals_separate_training_on_each_members_batches(mode):
    x, y = _data()
    n, epochs, bs, seed = 3, 3, 16, 5
    lrs = [0.05, 0.1, 0.02]
    ens = ve.Ensemble.from_factory(BNNet, n, seed=0)
    alone = ens.unstack()
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=lrs, momentum=0.9, weight_decay=0.01)
    fit(
        ens,
        (x, y),
        F.cross_entropy,
        optimizer=opt,
        epochs=epochs,
        batch_size=bs,
        data_mode=mode,
        seed=seed,
        max_grad_norm=1.0,
        progress=False,
    )
    # the reference: each member alone, on the batches MemberBatches draws for it (fit's
    # data generator is seeded with seed + 0x5EED)
    batches = MemberBatches(mode, 48, n, bs, torch.Generator().manual_seed(seed + 0x5EED))
    opts = [
        torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
        for m, lr in zip(alone, lrs)
    ]
    for _ in range(epochs):
        for index in batches.epoch():
            for i, (m, o) in enumerate(zip(alone, opts)):
                idx = index if mode == "shared" else index[i]
                o.zero_grad()
                F.cross_entropy(m(x[idx]), y[idx]).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                o.step()
    for i, m in enumerate(alone):
        _states_equal(ens.member(i), m, atol=1e-5)


# ----------------------------------------------------------------------------- fit


def test_same_seed_same_ensemble_with_dropout(deterministic):
    x, y = _data()

    def run(seed: int) -> ve.Ensemble:
        ens = ve.Ensemble.from_factory(_dropout_net, 3, seed=0)
        fit(
            ens,
            (x, y),
            F.cross_entropy,
            epochs=2,
            batch_size=16,
            data_mode="shuffle",
            seed=seed,
            progress=False,
        )
        return ens

    state = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    _states_equal(a, b)
    assert not torch.equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


def _lr_run(
    lrs: list[float],
    epochs: int,
    data_mode: str = "shuffle",
    members: list[int] | None = None,
    **kw,
) -> tuple[ve.Ensemble, History]:
    """BNNet members (``members`` of from_factory(seed=0), default all) trained by SGD."""
    x, y = _data(64)
    xv, yv = _data(32, seed=1)
    ens = ve.Ensemble.from_factory(BNNet, max(members or [0]) + 1 if members else len(lrs), seed=0)
    if members is not None:
        ens = ens.select(members)
    opt = MemberOptimizer(torch.optim.SGD, ens, lr=lrs, momentum=0.9)
    h = fit(
        ens,
        (x, y),
        F.cross_entropy,
        optimizer=opt,
        epochs=epochs,
        batch_size=16,
        data_mode=data_mode,
        val_data=(xv, yv),
        progress=False,
        **kw,
    )
    return ens, h


LRS = [0.05, 3.0, 0.01]  # member 1 overshoots: its validation loss stops improving early


def test_early_stopping_holds_stopped_members_and_restores_best_weights(deterministic):
    # (deterministic: runs of different lengths compared to 1e-6 must not differ in auto's
    # timed choice, whose kernels agree only up to rounding; seen flaking on a busy machine)
    patience, epochs = 2, 8
    ens, h = _lr_run(LRS, epochs, early_stopping_patience=patience, restore_best=False)
    assert h.best_epoch is not None and h.val_loss is not None
    stopped = [i for i, e in enumerate(h.stopped_epoch) if e is not None]
    assert stopped and len(stopped) < 3, h.stopped_epoch
    for i in stopped:
        e = h.stopped_epoch[i]
        assert h.stop_reason[i] == "early_stopping"
        assert e == int(h.best_epoch[i]) + patience
        # a stopped member stops changing: it equals the same member trained for e + 1 epochs
        shorter, _ = _lr_run(LRS, e + 1, restore_best=False)
        _states_equal(ens.member(i), shorter.member(i), atol=1e-6)
    # with restore_best, every member ends at its best epoch's weights (buffers included)
    best_ens, h2 = _lr_run(LRS, epochs, early_stopping_patience=patience)
    assert h2.best_epoch is not None
    for i in range(3):
        reference, _ = _lr_run(LRS, int(h2.best_epoch[i]) + 1, restore_best=False)
        _states_equal(best_ens.member(i), reference.member(i), atol=1e-6)


def test_keep_best_k_selects_the_members_with_the_lowest_validation_loss():
    ens, h = _lr_run([0.05, 3.0, 0.01, 0.1, 0.5], 3, keep_best_k=2)
    assert h.best_val_loss is not None and h.selected is not None and h.ensemble is not None
    want = sorted(torch.argsort(h.best_val_loss)[:2].tolist())
    assert h.selected == want and len(h.ensemble) == 2
    assert len(ens) == 5  # the ensemble passed in keeps all members
    for j, i in enumerate(want):
        _states_equal(h.ensemble.member(j), ens.member(i))
    val_min = h.val_loss.min(dim=0).values if h.val_loss is not None else None
    assert val_min is not None and torch.equal(val_min, h.best_val_loss)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, deterministic):
    x, y = _data(64)
    xv, yv = _data(32, seed=1)

    def run(epochs: int, **kw) -> tuple[ve.Ensemble, History]:
        ens = ve.Ensemble.from_factory(_dropout_net, 3, seed=0)
        opt = MemberOptimizer(torch.optim.AdamW, ens, lr=[0.01, 0.02, 0.005], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
        h = fit(
            ens,
            (x, y),
            F.cross_entropy,
            optimizer=opt,
            scheduler=sched,
            epochs=epochs,
            batch_size=16,
            data_mode="bootstrap",
            seed=3,
            val_data=(xv, yv),
            early_stopping_patience=1,
            progress=False,
            **kw,
        )
        return ens, h

    straight, h_straight = run(4)
    path = tmp_path / "ckpt.pt"
    run(2, checkpoint_every=2, checkpoint_path=path)
    assert torch.load(path, weights_only=True)["epoch"] == 2
    resumed, h_resumed = run(4, resume_from=path)
    _states_equal(resumed, straight)
    assert torch.equal(h_resumed.train_loss, h_straight.train_loss)
    assert h_resumed.val_loss is not None and h_straight.val_loss is not None
    assert torch.equal(h_resumed.val_loss, h_straight.val_loss)
    assert torch.equal(h_resumed.lr, h_straight.lr)
    assert h_resumed.stopped_epoch == h_straight.stopped_epoch
    with pytest.raises(ve.EnsembleError, match=r"batch_size=16.*batch_size=8"):
        ens = ve.Ensemble.from_factory(_dropout_net, 3, seed=0)
        fit(
            ens,
            (x, y),
            F.cross_entropy,
            epochs=4,
            batch_size=8,
            data_mode="bootstrap",
            seed=3,
            resume_from=path,
            progress=False,
        )


def test_nonfinite_member_raises_naming_it():
    with pytest.raises(
        ve.EnsembleError, match=r"member 1 diverged: its loss was \S+ at epoch 0, step [1-9]"
    ):
        _lr_run([0.05, 1e30, 0.01], 2)


def test_nonfinite_member_stops_and_the_others_keep_training(deterministic):
    ens, h = _lr_run(
        [0.05, 1e30, 0.01], 3, "shared", on_nonfinite="stop_member", restore_best=False
    )
    assert h.stop_reason == [None, "nonfinite", None] and h.stopped_epoch[1] == 0
    state = ens.member(1).state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    # member 1 is back at its weights from before the epoch it diverged in: its initial ones
    _states_equal(ens.member(1), ve.Ensemble.from_factory(BNNet, 3, seed=0).member(1))
    # the others trained exactly as without the diverging member (on the same batches)
    others, _ = _lr_run([0.05, 0.01], 3, "shared", members=[0, 2], restore_best=False)
    for j, i in enumerate([0, 2]):
        _states_equal(ens.member(i), others.member(j), atol=1e-6)


def test_bad_arguments_raise_ensemble_errors():
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    x, y = _data()
    with pytest.raises(ve.EnsembleError, match=r"share one non-zero leading.*\(48, 6\), \(47,\)"):
        fit(ens, (x, y[:-1]), F.cross_entropy, progress=False)
    with pytest.raises(ve.EnsembleError, match="need val_data"):
        fit(ens, (x, y), F.cross_entropy, early_stopping_patience=2, progress=False)
    with pytest.raises(ve.EnsembleError, match="data_mode"):
        fit(ens, (x, y), F.cross_entropy, data_mode="bagging", progress=False)
    with pytest.raises(ve.EnsembleError, match="keep_best_k=4 exceeds"):
        fit(ens, (x, y), F.cross_entropy, val_data=(x, y), keep_best_k=4, progress=False)
    with pytest.raises(ve.EnsembleError, match="built for 2 members"):
        other = ve.Ensemble.from_factory(BNNet, 2, seed=0)
        fit(
            ens,
            (x, y),
            F.cross_entropy,
            optimizer=MemberOptimizer(torch.optim.SGD, other, lr=0.1),
            progress=False,
        )
    with pytest.raises(ve.EnsembleError, match="one number per member"):
        fit(ens, (x, y), nn.CrossEntropyLoss(reduction="none"), progress=False)


def test_history_and_progress_bar(capsys):
    x, y = _data()
    ens = ve.Ensemble.from_factory(BNNet, 3, seed=0)
    h = fit(
        ens,
        torch.utils.data.TensorDataset(x, y),
        F.cross_entropy,
        epochs=2,
        val_data=(x, y),
        progress=True,
    )
    assert h.train_loss.shape == (2, 3) and h.lr.shape == (2, 3) and h.epochs == 2
    assert h.val_accuracy is not None and h.val_accuracy.shape == (2, 3)
    assert bool(((h.val_accuracy >= 0) & (h.val_accuracy <= 1)).all())
    assert h.ensemble is ens and h.selected is None
    assert "loss min/med/max" in capsys.readouterr().err
    # each member ends at its best epoch, whose val loss is the member's own, in eval mode
    assert h.best_val_loss is not None
    for i in range(3):
        m = ens.member(i).eval()
        torch.testing.assert_close(
            h.best_val_loss[i], F.cross_entropy(m(x), y), atol=1e-6, rtol=1e-5
        )


def test_members_finite_names_exactly_the_members_with_a_nan_or_an_infinity():
    from vensemble._members import member_state, members_finite

    ens = ve.Ensemble.from_factory(BNNet, 4, seed=0)
    state = member_state(ens)
    assert members_finite(state, 4).tolist() == [True] * 4
    with torch.no_grad():
        w = state["fc1.weight"]  # in-major: member rows in memory order
        w[1, 0, 0] = w[1, 0, 1] = 3e38  # finite, but their sum overflows
        assert members_finite(state, 4).tolist() == [True] * 4
        w[2, 3, 1] = float("-inf")
        state["bn.running_var"][3, 0] = float("nan")
    assert members_finite(state, 4).tolist() == [True, True, False, False]


class _Masked(nn.Module):
    """Causal attention over features: an additive mask buffer that holds -inf by design."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

    def forward(self, x: Tensor) -> Tensor:
        scores = self.lin(x).unsqueeze(-1) + self.mask
        return (torch.softmax(scores, -1) @ x.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("on_nonfinite", ["raise", "stop_member"])
def test_a_buffer_that_is_not_finite_by_design_is_no_divergence(on_nonfinite):
    """fit watches the tensors that were finite when it started: an attention mask's -inf
    made every member 'diverged' (raised, or stopped them all at their start weights)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 4)
    ens = ve.Ensemble.from_factory(_Masked, 3, seed=0)
    start = ens.lin.weight.detach().clone()
    h = fit(ens, (x, y), F.mse_loss, epochs=2, batch_size=16, progress=False, on_nonfinite=on_nonfinite)  # fmt: skip
    assert h.stop_reason == [None] * 3
    assert not torch.equal(ens.lin.weight, start)  # (trained)
    with torch.no_grad():
        ens.lin.weight[1, 0, 0] = float("nan")  # a real divergence is still seen
    h = fit(ens, (x, y), F.mse_loss, epochs=1, batch_size=16, progress=False, on_nonfinite="stop_member")  # fmt: skip
    assert h.stop_reason == [None, "nonfinite", None]


def test_resuming_with_restore_best_from_a_run_without_it_is_refused(tmp_path):
    """Such a checkpoint holds no best weights: the members whose best epoch came before it
    would have been 'restored' to the weights they started from."""
    x, y = _data(64)
    xv, yv = _data(32, seed=1)

    def run(epochs: int, **kw) -> None:
        ens = ve.Ensemble.from_factory(_dropout_net, 2, seed=0)
        fit(
            ens,
            (x, y),
            F.cross_entropy,
            epochs=epochs,
            batch_size=16,
            seed=3,
            val_data=(xv, yv),
            progress=False,
            **kw,
        )

    path = tmp_path / "ckpt.pt"
    run(2, restore_best=False, checkpoint_every=2, checkpoint_path=path)
    with pytest.raises(ve.EnsembleError, match=r"holds no best weights.*restore_best=False"):
        run(4, restore_best=True, resume_from=path)
    run(4, restore_best=False, resume_from=path)  # as it was written: resumes


def test_a_failed_checkpoint_write_leaves_the_previous_one_and_no_temporary_file(
    tmp_path, monkeypatch
):
    from vensemble import _checkpoint

    path = tmp_path / "ckpt.pt"
    _checkpoint.save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def half_then_fail(obj, f) -> None:
        real_save({"epoch": 2, "big": torch.zeros(1000)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _checkpoint.save_checkpoint(path, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_float64_losses_are_recorded_and_compared_in_float64():
    # fit rounded every loss to float32: a float64 member improving by 1.6e-9 per epoch read
    # the same loss twice and was stopped early; alone it never stops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 1, generator=g, dtype=torch.float64)
    xv = torch.randn(32, 4, generator=g, dtype=torch.float64)
    yv = xv @ torch.ones(4, 1, dtype=torch.float64)
    ens = ve.Ensemble.from_factory(lambda: nn.Linear(4, 1), 1, seed=0).double()
    alone = ens.member(0)
    opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=1e-9)
    h = ve.fit(
        ens, (x, y), nn.MSELoss(), optimizer=opt, epochs=5, batch_size=64,
        val_data=(xv, yv), early_stopping_patience=1, progress=False,
    )  # fmt: skip
    o = torch.optim.SGD(alone.parameters(), lr=1e-9)
    want = []
    for _ in range(5):  # one full batch per epoch
        o.zero_grad()
        nn.functional.mse_loss(alone(x), y).backward()
        o.step()
        with torch.no_grad():
            want.append(nn.functional.mse_loss(alone(xv), yv).item())
    assert all(b < a for a, b in itertools.pairwise(want))  # alone: improving every epoch
    assert h.val_loss.dtype == h.train_loss.dtype == torch.float64
    assert h.val_loss[:, 0].tolist() == pytest.approx(want, rel=1e-13, abs=0)
    assert h.stopped_epoch == [None] and h.best_epoch.tolist() == [4]
