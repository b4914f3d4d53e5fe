"""Per-member training status: stopped members held fixed, best and last finite weights kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._errors import EnsembleError
from ._layout import member_rows

__all__ = ["MemberStatus", "member_state", "members_finite"]


def member_state(module: nn.Module) -> dict[str, Tensor]:
    """The stacked parameters and buffers, by name: each ``(N, ...)``."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def members_finite(state: dict[str, Tensor], n: int) -> Tensor:
    """Whether each member's floating-point tensors are all finite, shape ``(N,)``.

    First one sum per member and tensor: NaN and infinity survive a sum, so a finite sum
    clears the member (this runs every epoch, and a sum is one pass with no mask to
    allocate). Only when some sum is not finite (a sum of huge finite values can overflow
    too) are the elements checked one by one.
    """
    if not state:
        return torch.ones(n, dtype=torch.bool)
    ok = torch.ones(n, dtype=torch.bool, device=next(iter(state.values())).device)
    rows = [
        member_rows(t.detach())  # in memory order: no copy
        for t in state.values()
        if t.is_floating_point() or t.is_complex()
    ]
    for r in rows:
        ok &= torch.isfinite(r.sum(dim=1))
    if bool(ok.all()):
        return ok
    ok.fill_(True)
    for r in rows:
        ok &= torch.isfinite(r).all(dim=1)
    return ok


class MemberStatus:
    """Which members still train, and the weights to hold or restore for each.

    A stopped member stops changing: after every optimizer step its parameters and buffers
    (BatchNorm running statistics included) are copied back from a frozen copy, and its
    gradients are zeroed before the step, so neither momentum, weight decay nor clipping
    moves it (its optimizer state, shared with the other members in one param group, still
    steps). ``best`` holds each member's weights at its lowest validation loss;
    ``last_good`` (kept only when asked) holds the weights at the start of the epoch, to
    which a member whose loss turns non-finite returns.

    Args:
        ens: the ensemble; its stacked tensors are read and written in place.
        n: the number of members.
        keep_best: keep each member's best weights.
        keep_last_good: keep the epoch-start weights.
    """

    def __init__(self, ens: nn.Module, n: int, keep_best: bool, keep_last_good: bool) -> None:
        self.state = member_state(ens)
        # what a diverging member makes non-finite: the floating-point tensors that are finite
        # now (a buffer may hold -inf by design: an attention mask added to the scores)
        self.watched = {
            k: t
            for k, t in self.state.items()
            if (t.is_floating_point() or t.is_complex()) and bool(torch.isfinite(t).all())
        }
        self.n = n
        device = next(iter(self.state.values())).device
        self.stopped = torch.zeros(n, dtype=torch.bool, device=device)
        self.stopped_list: list[int] = []
        self.stopped_epoch: list[int | None] = [None] * n
        self.stop_reason: list[str | None] = [None] * n
        self.best_val = torch.full((n,), float("inf"), device=device)
        self.best_epoch = torch.full((n,), -1, dtype=torch.long, device=device)
        self.since_best = torch.zeros(n, dtype=torch.long, device=device)
        self.best = self._copy() if keep_best else None
        self.last_good = self._copy() if keep_last_good else None
        self._frozen_index: Tensor | None = None
        self._frozen: dict[str, Tensor] = {}

    def _copy(self) -> dict[str, Tensor]:
        return {k: t.detach().clone() for k, t in self.state.items()}

    # ----------------------------------------------------------------------------- stopping

    @property
    def active(self) -> list[int]:
        return [i for i in range(self.n) if self.stop_reason[i] is None]

    def stop(self, members: list[int], reason: str, epoch: int) -> None:
        """Stop ``members`` at their current weights (they are held there from now on)."""
        for i in members:
            self.stopped_epoch[i] = epoch
            self.stop_reason[i] = reason
        self.stopped_list = [i for i in range(self.n) if self.stop_reason[i] is not None]
        self.stopped = torch.zeros_like(self.stopped)
        if not self.stopped_list:
            self._frozen_index = None
            return
        index = torch.tensor(self.stopped_list, device=self.stopped.device)
        self.stopped[index] = True
        self._frozen_index = index
        self._frozen = {k: t.detach().index_select(0, index) for k, t in self.state.items()}

    # (both run at every step: with no member stopped they return before entering no_grad)

    def mask_grads(self) -> None:
        """Zero the stopped members' gradients (call between backward and the step)."""
        if self._frozen_index is None:
            return
        with torch.no_grad():
            for t in self.state.values():
                if t.grad is not None:
                    t.grad.index_fill_(0, self._frozen_index, 0)

    def hold(self) -> None:
        """Put the stopped members' frozen weights back (call after the step)."""
        if self._frozen_index is None:
            return
        with torch.no_grad():
            for k, t in self.state.items():
                t.index_copy_(0, self._frozen_index, self._frozen[k])

    # ----------------------------------------------------------------------------- snapshots

    @torch.no_grad()
    def restore(self, source: dict[str, Tensor], members: list[int]) -> None:
        """Copy ``members``' slices of ``source`` (stacked ``(N, ...)``) into the ensemble."""
        if not members:
            return
        index = torch.tensor(members, device=self.stopped.device)
        for k, t in self.state.items():
            t.index_copy_(0, index, source[k].index_select(0, index))

    @torch.no_grad()
    def save_last_good(self) -> None:
        if self.last_good is not None:
            for k, t in self.state.items():
                self.last_good[k].copy_(t)

    @torch.no_grad()
    def record_validation(self, val_loss: Tensor, epoch: int) -> list[int]:
        """Update each active member's best; returns the members that improved."""
        improved = (val_loss < self.best_val) & ~self.stopped  # NaN never improves
        self.best_val = torch.where(improved, val_loss, self.best_val)
        self.best_epoch = torch.where(improved, epoch, self.best_epoch)
        self.since_best = torch.where(improved, 0, self.since_best + 1)
        members = torch.nonzero(improved).flatten().tolist()
        if self.best is not None and members:
            index = torch.tensor(members, device=self.stopped.device)
            for k, t in self.state.items():
                self.best[k].index_copy_(0, index, t.detach().index_select(0, index))
        return members

    def restore_best(self) -> None:
        """Give every member that ever had a finite validation loss its best weights."""
        if self.best is not None:
            self.restore(self.best, torch.nonzero(self.best_epoch >= 0).flatten().tolist())

    # ----------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the ensemble's weights (frozen = current weights)."""
        return {
            "stopped_epoch": list(self.stopped_epoch),
            "stop_reason": list(self.stop_reason),
            "best_val": self.best_val.clone(),
            "best_epoch": self.best_epoch.clone(),
            "since_best": self.since_best.clone(),
            "best": None if self.best is None else {k: v.clone() for k, v in self.best.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.best is not None and sd["best"] is None and bool((sd["best_epoch"] >= 0).any()):
            raise EnsembleError(
                "the checkpoint holds no best weights (its run had restore_best=False), so the "
                "members whose best epoch came before it cannot get theirs back: resume with "
                "restore_best=False"
            )
        device = self.stopped.device
        self.stopped_epoch = list(sd["stopped_epoch"])
        self.stop_reason = list(sd["stop_reason"])
        self.best_val = sd["best_val"].to(device)
        self.best_epoch = sd["best_epoch"].to(device)
        self.since_best = sd["since_best"].to(device)
        if self.best is not None and sd["best"] is not None:
            for k, v in sd["best"].items():
                self.best[k].copy_(v)
        self.save_last_good()  # at an epoch's end the last good weights are the current ones
        self.stop([], "", 0)  # rebuild the frozen copies from the (loaded) current weights
