"""Vectorized training: N members trained in one loop, each exactly as if trained alone.

The pieces: :func:`member_loss` (each member's own loss; train on its sum),
:class:`MemberOptimizer` (any torch optimizer, per-member hyperparameters),
:func:`clip_grad_norm_` (per member) and :func:`fit` (the loop: per-member data, validation,
early stopping, best-k, checkpoints), which returns a :class:`History`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ._checkpoint import (
    FORMAT,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seeded,
    set_rng_state,
)
from ._clip import clip_grad_norm_
from ._data import DATA_MODES, MemberBatches, as_tensors
from ._dist_fit import MemberSync, member_sync
from ._errors import EnsembleError
from ._history import History
from ._losses import LossFn, member_loss
from ._members import MemberStatus, members_finite
from ._optim import MemberOptimizer
from ._plateau import MemberReduceLROnPlateau
from .ensemble import Ensemble

if TYPE_CHECKING:
    from .distributed import ShardedEnsemble

__all__ = [
    "History",
    "MemberOptimizer",
    "MemberReduceLROnPlateau",
    "clip_grad_norm_",
    "fit",
    "member_loss",
]

_ON_NONFINITE = ("raise", "stop_member")
_DATA_SEED_OFFSET = 0x5EED  # the data order and the model's random ops use different streams

OptimizerArg = Optimizer | Callable[[Ensemble], Optimizer] | None
SchedulerArg = (
    LRScheduler | ReduceLROnPlateau | MemberReduceLROnPlateau | Callable[[Optimizer], Any] | None
)


def _positive(name: str, value: Any, allow_none: bool = True, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise EnsembleError(
            f"{name} must be {kind} int{' or None' if allow_none else ''}, got {value!r}"
        )


def _member_lrs(optimizer: Optimizer, n: int) -> Tensor:
    if isinstance(optimizer, MemberOptimizer):
        return optimizer.member_lr
    return torch.full((n,), float(optimizer.param_groups[0]["lr"]), dtype=torch.float64)


@torch.no_grad()
def _evaluate(
    ens: Ensemble, data: tuple[Tensor, ...], loss_fn: LossFn, batch_size: int
) -> tuple[Tensor, Tensor | None]:
    """Each member's validation loss ``(N,)`` and, for classification, accuracy ``(N,)``."""
    *inputs, targets = data
    n = targets.shape[0]
    classify = targets.ndim == 1 and not (targets.is_floating_point() or targets.is_complex())
    total: Tensor | float = 0.0
    correct: Tensor | None = None
    was_training = ens.training
    ens.eval()
    try:
        for s in range(0, n, batch_size):
            out = ens(*[t[s : s + batch_size] for t in inputs])  # (N, b, ...)
            y = targets[s : s + batch_size]
            losses = member_loss(loss_fn, out, y, per_member_targets=False)
            total = total + _at_least_float32(losses) * len(y)
            if classify and out.ndim == 3:
                hits = (out.argmax(dim=-1) == y).sum(dim=1)  # (N,)
                correct = hits if correct is None else correct + hits
    finally:
        ens.train(was_training)
    assert isinstance(total, Tensor)  # (validation data has a sample: checked by fit)
    return total / n, None if correct is None else correct.float() / n


def _at_least_float32(t: Tensor) -> Tensor:
    """Losses recorded in their own precision (float64 members: early stopping must see
    changes below float32's resolution), half-precision ones in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _Run:
    """The state of one :func:`fit` call, trained epoch by epoch."""

    def __init__(
        self,
        ens: Ensemble,
        loss_fn: LossFn,
        optimizer: Optimizer,
        data: tuple[Tensor, ...],
        val: tuple[Tensor, ...] | None,
        batches: MemberBatches,
        status: MemberStatus,
        scheduler: Any,
        max_grad_norm: float | None,
        on_nonfinite: str,
        patience: int | None,
        sync: MemberSync,
    ) -> None:
        self.ens, self.loss_fn, self.optimizer, self.sync = ens, loss_fn, optimizer, sync
        self.data, self.val, self.batches, self.status = data, val, batches, status
        self.scheduler, self.max_grad_norm = scheduler, max_grad_norm
        self.on_nonfinite, self.patience = on_nonfinite, patience
        self.val_batch_size = 4 * batches.batch_size
        self.n = len(ens)
        self.history = History.empty(sync.total)
        self.rows: dict[str, list[Tensor]] = {"train_loss": [], "lr": []}

    def step_epoch(self, epoch: int) -> None:
        ens, status = self.ens, self.status
        ens.train()
        device = status.stopped.device
        in_dims = 0 if self.batches.per_member else None
        step_losses: list[Tensor] = []  # (N,) per step; nothing is synced until the epoch ends
        for index in self.batches.epoch(device):
            *inputs, targets = [t[index] for t in self.data]  # (b, ...) or (N, b, ...)
            out = ens(*inputs, in_dims=in_dims)  # (N, b, ...)
            losses = member_loss(
                self.loss_fn, out, targets, per_member_targets=self.batches.per_member
            )  # (N,)
            self.optimizer.zero_grad(set_to_none=True)
            # a member's NaN stays in its own gradients: the sum's backward sends 1 to each
            losses.sum().backward()
            status.mask_grads()
            if self.max_grad_norm is not None:
                clip_grad_norm_(ens, self.max_grad_norm)
            self.optimizer.step()
            status.hold()
            step_losses.append(losses.detach())
        # each member's epoch loss: its step losses weighted by batch size, summed along its
        # own row (steps in order): the same sum whatever N is, so a member's epoch loss does
        # not depend on how many members share its process
        per_step = _at_least_float32(torch.stack(step_losses))  # (steps, N)
        sizes = torch.full((per_step.shape[0],), float(self.batches.batch_size))
        sizes[-1] = self.batches.n - (per_step.shape[0] - 1) * self.batches.batch_size
        rows = per_step.t().contiguous()  # (N, steps)
        row = (rows * sizes.to(rows.device)).sum(dim=1) / self.batches.n
        self.rows["train_loss"].append(self.sync.rows(row, "training losses"))
        self._check_finite(epoch, per_step)

    def _check_finite(self, epoch: int, per_step: Tensor) -> None:
        """Members whose loss or weights turned non-finite this epoch: raise, or stop them."""
        status = self.status
        weights_ok = members_finite(status.watched, self.n).to(per_step.device)
        bad_step = ~torch.isfinite(per_step)  # (steps, N)
        bad = (bad_step.any(dim=0) | ~weights_ok) & ~status.stopped
        members = torch.nonzero(bad).flatten().tolist()  # local indices
        if not members:
            status.save_last_good()
            return
        if self.on_nonfinite == "raise":
            i = members[0]
            steps = torch.nonzero(bad_step[:, i]).flatten().tolist()
            where = (
                f"its loss was {float(per_step[steps[0], i])} at epoch {epoch}, step {steps[0]}"
                if steps
                else f"its weights became non-finite by the end of epoch {epoch}"
            )
            first = self.sync.first  # local to global member indices
            raise EnsembleError(
                f"member {i + first} diverged: {where} (members {[m + first for m in members]} "
                "in all). Lower its learning rate, clip its gradients, or pass "
                "on_nonfinite='stop_member' to stop only the diverged members and keep training "
                "the others"
            )
        status.restore(status.last_good or {}, members)
        status.stop(members, "nonfinite", epoch)
        status.save_last_good()

    def validate(self, epoch: int) -> None:
        if self.val is None:
            return
        vloss, vacc = _evaluate(self.ens, self.val, self.loss_fn, self.val_batch_size)
        self.rows.setdefault("val_loss", []).append(self.sync.rows(vloss, "validation losses"))
        if vacc is not None:
            self.rows.setdefault("val_accuracy", []).append(self.sync.rows(vacc, "accuracies"))
        self.status.record_validation(vloss, epoch)
        if self.patience is not None:
            due = (self.status.since_best >= self.patience) & ~self.status.stopped
            self.status.stop(torch.nonzero(due).flatten().tolist(), "early_stopping", epoch)

    def finish_epoch(self, epoch: int, lr: Tensor) -> None:
        self.rows["lr"].append(self.sync.rows(lr, "learning rates"))
        if self.scheduler is None:
            return
        loss = self.rows.get("val_loss", self.rows["train_loss"])[-1]  # (N,): plateaus watch it
        if isinstance(self.scheduler, MemberReduceLROnPlateau):  # each on its own loss
            first = self.sync.first  # this rank's members among the rows
            self.scheduler.step(loss[first : first + self.n], ~self.status.stopped)
        elif isinstance(self.scheduler, ReduceLROnPlateau):
            stopped = self.sync.rows(self.status.stopped, "stopped members")
            active = torch.nonzero(~stopped).flatten().tolist() or list(range(len(stopped)))
            self.scheduler.step(float(loss[active].mean()))
        else:
            self.scheduler.step()

    def any_active(self) -> bool:
        """Whether any member (on any rank) still trains."""
        return bool((~self.sync.rows(self.status.stopped, "stopped members")).any())

    def sync_history(self) -> None:
        h, s, sync = self.history, self.status, self.sync
        for key, rows in self.rows.items():
            if rows:
                setattr(h, key, torch.stack([r.cpu() for r in rows]))  # (epochs, N)
        if self.val is not None:
            h.best_epoch = sync.rows(s.best_epoch, "best epochs").cpu()
            h.best_val_loss = sync.rows(s.best_val, "best validation losses").cpu()
        h.stopped_epoch = sync.values(list(s.stopped_epoch), "stopped epochs")
        h.stop_reason = sync.values(list(s.stop_reason), "stop reasons")
        boot = self.batches.bootstrap
        h.bootstrap_indices = None if boot is None else sync.rows(boot, "bootstrap samples")

    def checkpoint(self, epoch: int, config: dict[str, Any]) -> dict[str, Any]:
        sched = self.scheduler.state_dict() if self.scheduler is not None else None
        return {
            "format": FORMAT,
            "epoch": epoch + 1,
            "config": config,
            "ensemble": self.ens.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": sched,
            "rng": rng_state(self.batches.generator),
            "rows": {k: [r.cpu() for r in v] for k, v in self.rows.items()},
            "members": self.status.state_dict(),
            "bootstrap": self.batches.bootstrap,
        }

    def resume(self, payload: dict[str, Any]) -> int:
        self.ens.load_state_dict(payload["ensemble"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        device = self.status.stopped.device
        self.rows = {k: [r.to(device) for r in v] for k, v in payload["rows"].items()}
        self.status.load_state_dict(payload["members"])
        set_rng_state(payload["rng"], self.batches.generator)
        self.sync_history()
        return int(payload["epoch"])


def _progress_text(rows: dict[str, list[Tensor]]) -> str:
    def summary(values: Tensor) -> str:
        v = values[torch.isfinite(values)]
        if v.numel() == 0:
            return "nan"
        return f"{float(v.min()):.4g}/{float(v.median()):.4g}/{float(v.max()):.4g}"

    text = f"loss min/med/max {summary(rows['train_loss'][-1])}"
    if "val_loss" in rows:
        text += f", val {summary(rows['val_loss'][-1])}"
    return text


def _check_args(
    ens: Ensemble,
    total: int,
    epochs: int,
    data_mode: str,
    val_data: Any,
    patience: int | None,
    keep_best_k: int | None,
    on_nonfinite: str,
    checkpoint_every: int | None,
    checkpoint_path: Any,
    max_grad_norm: float | None,
) -> None:
    if not isinstance(ens, Ensemble):
        raise EnsembleError(f"fit trains a vensemble.Ensemble, got {type(ens).__name__}")
    _positive("epochs", epochs, allow_none=False, allow_zero=True)
    _positive("early_stopping_patience", patience)
    _positive("keep_best_k", keep_best_k)
    _positive("checkpoint_every", checkpoint_every)
    if data_mode not in DATA_MODES:
        raise EnsembleError(f"data_mode must be one of {DATA_MODES}, got {data_mode!r}")
    if on_nonfinite not in _ON_NONFINITE:
        raise EnsembleError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
    if val_data is None and (patience is not None or keep_best_k is not None):
        raise EnsembleError("early_stopping_patience and keep_best_k need val_data")
    if keep_best_k is not None and keep_best_k > total:
        raise EnsembleError(f"keep_best_k={keep_best_k} exceeds the {total} members")
    if checkpoint_every is not None and checkpoint_path is None:
        raise EnsembleError("checkpoint_every needs checkpoint_path")
    if max_grad_norm is not None and not float(max_grad_norm) >= 0:
        raise EnsembleError(f"max_grad_norm must be non-negative, got {max_grad_norm!r}")


def fit(
    ens: Ensemble | ShardedEnsemble,
    train_data: Any,
    loss_fn: LossFn,
    *,
    optimizer: OptimizerArg = None,
    epochs: int = 10,
    batch_size: int = 64,
    data_mode: str = "shared",
    seed: int | None = 0,
    val_data: Any = None,
    early_stopping_patience: int | None = None,
    restore_best: bool = True,
    keep_best_k: int | None = None,
    max_grad_norm: float | None = None,
    on_nonfinite: str = "raise",
    scheduler: SchedulerArg = None,
    checkpoint_every: int | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> History:
    """Train every member of ``ens`` in one vectorized loop, each as if trained alone.

    Each step runs all members on their batches, sums the members' own mean losses
    (:func:`member_loss`), backpropagates once, optionally clips each member's gradients
    (:func:`clip_grad_norm_`) and takes one optimizer step. ``ens`` is trained in place.

    Data modes (all seeded): ``"shared"``: one shuffle per epoch, the same batches for all
    members; ``"shuffle"``: an independent shuffle per member; ``"bootstrap"``: bagging, each
    member trains on its own sample of ``n`` draws with replacement (drawn once, shuffled
    every epoch; see ``History.bootstrap_indices``). The per-member orders come from one
    generator for all members: with the same seed, member ``i`` gets other batches in an
    ensemble of another size.

    With ``val_data``, each member's validation loss (and accuracy, for classification) is
    measured after every epoch (in eval mode, in batches of ``4 * batch_size``): the mean of
    the batches' losses, each weighted by its number of samples, which is the loss over the
    whole set for losses averaged over samples (not for ``reduction="sum"``, nor with an
    ``ignore_index`` that leaves batches with different counts). With
    ``early_stopping_patience=p``, a member whose validation loss has not improved for ``p``
    epochs stops: from then on its weights and buffers do not change (its gradients are
    zeroed and they are held). Its optimizer state still steps with those zero gradients
    (Adam's step count, decaying moments): training the member further in a later ``fit``
    starts from that state, not from the one it stopped with. With ``restore_best`` (default), every member ends with
    its weights from its best epoch. ``keep_best_k=k`` then keeps the ``k`` members with the
    lowest validation loss: ``ens`` still holds all members, and ``History.ensemble`` is a
    new ensemble of the ``k`` kept ones (``History.selected`` their indices).

    Non-finite losses are checked once per epoch (no host sync per step): with
    ``on_nonfinite="raise"`` an :class:`EnsembleError` names the member, epoch and step;
    with ``"stop_member"`` the diverged member returns to its weights at the start of that
    epoch and stops, while the others keep training (members are independent, so its NaNs
    never reach them).

    Randomness: ``seed`` seeds the data order and torch's RNG (dropout draws independently
    per member); the same seed gives the same trained ensemble (to the bit with a fixed
    ``backend`` or under ``torch.use_deterministic_algorithms(True)``: ``auto`` times its
    paths, which agree up to rounding), and the caller's RNG state is restored afterwards.
    ``seed=None`` uses the current RNG state.

    A :class:`~vensemble.distributed.ShardedEnsemble` (``fit`` runs on every rank) trains
    each rank's block; member ``i`` gets the data it gets at any world size, the history
    holds all members on every rank, ``keep_best_k`` gathers the kept members into an
    ``Ensemble`` on every rank, and checkpoints are per rank (``<path>.rank<r>-of-<W>``).

    Checkpoints (``checkpoint_every=k`` epochs, overwriting ``checkpoint_path``) hold the
    weights, optimizer and scheduler state, RNG states and history, as plain tensors (read
    with ``torch.load(weights_only=True)``). ``resume_from=path`` continues such a run up to
    ``epochs`` in all, with the same result as an uninterrupted run; build the optimizer and
    scheduler as for the original run.

    Args:
        ens: the ensemble (or a rank's shard) to train, in place.
        train_data: ``(inputs, targets)`` (or ``(input_1, ..., targets)``) tensors with a
            leading sample dim, or a ``TensorDataset``.
        loss_fn: ``loss_fn(member_outputs, member_targets) -> 0-dim tensor``, e.g.
            ``torch.nn.functional.cross_entropy``.
        optimizer: a :class:`MemberOptimizer` (or any torch optimizer over
            ``ens.parameters()``), a function ``ens -> optimizer``, or ``None`` for
            ``MemberOptimizer(torch.optim.Adam, ens, lr=1e-3)``.
        epochs: the total number of epochs.
        batch_size: samples per member per step.
        data_mode: ``"shared"``, ``"shuffle"`` or ``"bootstrap"``.
        seed: see above.
        val_data: validation ``(inputs, targets)``, shared by all members.
        early_stopping_patience: epochs without improvement before a member stops.
        restore_best: with ``val_data``, end each member at its best epoch's weights.
        keep_best_k: keep only the ``k`` best members (see above).
        max_grad_norm: clip each member's gradient norm to this (per member).
        on_nonfinite: ``"raise"`` or ``"stop_member"``.
        scheduler: a ``torch.optim.lr_scheduler`` scheduler on the optimizer, or a function
            ``optimizer -> scheduler``; stepped once per epoch (``ReduceLROnPlateau`` with the
            active members' mean validation, else training, loss, which couples the members;
            :class:`~vensemble.MemberReduceLROnPlateau` with each member's own).
        checkpoint_every: save a checkpoint every this many epochs.
        checkpoint_path: the checkpoint file.
        resume_from: a checkpoint written by ``fit`` to continue from.
        progress: show a tqdm bar with the members' min/median/max loss.

    Returns:
        The run's :class:`History` (``history.ensemble`` is the trained ensemble).

    Raises:
        EnsembleError: for invalid arguments, targets that do not match the outputs, a
            diverged member with ``on_nonfinite="raise"``, or a checkpoint from another setup.

    Example:
        >>> import torch, torch.nn.functional as F, vensemble as ve
        >>> ens = ve.Ensemble.from_factory(lambda: torch.nn.Linear(4, 3), 5, seed=0)
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> h = fit(ens, (x, y), F.cross_entropy, epochs=2, batch_size=16, progress=False)
        >>> h.train_loss.shape  # (epochs, members)
        torch.Size([2, 5])
    """
    ens, sync = member_sync(ens)  # a ShardedEnsemble trains its local block
    _check_args(
        ens,
        sync.total,
        epochs,
        data_mode,
        val_data,
        early_stopping_patience,
        keep_best_k,
        on_nonfinite,
        checkpoint_every,
        checkpoint_path,
        max_grad_norm,
    )
    n = len(ens)
    first = next(iter(ens.state_dict().values()), None)
    device = first.device if first is not None else torch.device("cpu")
    data = tuple(t.to(device) for t in as_tensors(train_data, "train_data"))
    val = (
        None if val_data is None else tuple(t.to(device) for t in as_tensors(val_data, "val_data"))
    )
    sync.same_data(data, "train_data")
    if val is not None:
        sync.same_data(val, "val_data")
    num_samples = data[0].shape[0]
    config = {
        "num_members": sync.total,
        "num_samples": num_samples,
        "data_mode": data_mode,
        "batch_size": batch_size,
        "seed": seed,
        **sync.config,
    }
    was_training = ens.training
    with seeded(seed, device):
        # without a seed, the data order comes from the caller's RNG
        data_seed = int(torch.randint(0, 2**62, ())) if seed is None else seed + _DATA_SEED_OFFSET
        generator = torch.Generator().manual_seed(data_seed)
        batches = MemberBatches(
            data_mode,
            num_samples,
            n,
            batch_size,
            generator,
            first_member=sync.first,
            total_members=sync.total,
        )
        if optimizer is None:
            optimizer = MemberOptimizer(torch.optim.Adam, ens, lr=1e-3)
        elif not isinstance(optimizer, Optimizer):
            optimizer = optimizer(ens)
        if isinstance(optimizer, MemberOptimizer) and optimizer.num_members != n:
            raise EnsembleError(
                f"the optimizer was built for {optimizer.num_members} members, the ensemble has {n}"
            )
        if scheduler is not None and not isinstance(
            scheduler, (LRScheduler, ReduceLROnPlateau, MemberReduceLROnPlateau)
        ):
            scheduler = scheduler(optimizer)
        status = MemberStatus(
            ens,
            n,
            keep_best=val is not None and restore_best,
            keep_last_good=on_nonfinite == "stop_member",
        )
        run = _Run(
            ens,
            loss_fn,
            optimizer,
            data=data,
            val=val,
            batches=batches,
            status=status,
            scheduler=scheduler,
            max_grad_norm=max_grad_norm,
            on_nonfinite=on_nonfinite,
            patience=early_stopping_patience,
            sync=sync,
        )
        start = 0
        if resume_from is not None:
            payload = load_checkpoint(sync.path(Path(resume_from)), config)
            if payload["bootstrap"] is not None:
                batches.bootstrap = payload["bootstrap"]
            start = run.resume(payload)
        _train(run, start, epochs, config, checkpoint_every, checkpoint_path, progress)
    run.sync_history()
    if val is not None and restore_best:
        status.restore_best()
    ens.train(was_training)
    history = run.history
    history.ensemble = sync.whole(ens)
    if keep_best_k is not None and history.best_val_loss is not None:
        order = torch.argsort(history.best_val_loss, stable=True)[:keep_best_k]
        history.selected = sorted(order.tolist())
        history.ensemble = sync.kept(ens, history.selected)
    return history


def _train(
    run: _Run,
    start: int,
    epochs: int,
    config: dict[str, Any],
    checkpoint_every: int | None,
    checkpoint_path: str | os.PathLike[str] | None,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    show = progress and run.sync.main
    with tqdm(total=epochs, initial=start, disable=not show, desc="fit", unit="epoch") as bar:
        for epoch in range(start, epochs):
            if not run.any_active():
                break
            lr = _member_lrs(run.optimizer, run.n)
            run.step_epoch(epoch)
            run.validate(epoch)
            run.finish_epoch(epoch, lr)
            if show:
                bar.set_postfix_str(_progress_text(run.rows), refresh=False)
            bar.update(1)
            if checkpoint_every is not None and (epoch + 1) % checkpoint_every == 0:
                path = run.sync.path(Path(str(checkpoint_path)))
                save_checkpoint(path, run.checkpoint(epoch, config))
