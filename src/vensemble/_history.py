"""History: what :func:`vensemble.fit` did to each member, epoch by epoch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from .ensemble import Ensemble

__all__ = ["History"]


@dataclass
class History:
    """Per-member record of a :func:`vensemble.fit` run. Epochs count from 0.

    Attributes:
        train_loss: each member's mean training loss per epoch, shape ``(epochs, N)``.
        val_loss: each member's validation loss per epoch ``(epochs, N)``, or ``None``
            without validation data.
        val_accuracy: each member's validation accuracy ``(epochs, N)`` for classification
            (outputs ``(N, B, C)``, integer targets ``(B,)``), else ``None``.
        lr: each member's learning rate during each epoch ``(epochs, N)``. With a plain torch
            optimizer, which holds no per-member rates, its first param group's rate, the same
            for every member.
        best_epoch: the epoch of each member's lowest validation loss ``(N,)``, -1 if none.
        best_val_loss: each member's lowest validation loss ``(N,)`` (inf if none).
        stopped_epoch: the epoch after which each member stopped changing, or ``None``.
        stop_reason: ``"early_stopping"``, ``"nonfinite"`` or ``None`` for each member.
        selected: with ``keep_best_k``, the indices of the kept members (in member order).
        bootstrap_indices: in ``data_mode="bootstrap"``, each member's bootstrap sample
            ``(N, n)`` (indices into the training data).
        ensemble: the trained ensemble: the one passed to ``fit`` (trained in place), or,
            with ``keep_best_k``, a new ensemble of the kept members.

    Example:
        >>> h = History(train_loss=torch.tensor([[1.0, 2.0], [0.5, 1.5]]), lr=torch.zeros(2, 2))
        >>> h.epochs, h.num_members
        (2, 2)
    """

    train_loss: Tensor
    lr: Tensor
    val_loss: Tensor | None = None
    val_accuracy: Tensor | None = None
    best_epoch: Tensor | None = None
    best_val_loss: Tensor | None = None
    stopped_epoch: list[int | None] = field(default_factory=list)
    stop_reason: list[str | None] = field(default_factory=list)
    selected: list[int] | None = None
    bootstrap_indices: Tensor | None = None
    ensemble: Ensemble | None = field(default=None, repr=False, compare=False)

    @property
    def epochs(self) -> int:
        """The number of epochs run."""
        return int(self.train_loss.shape[0])

    @property
    def num_members(self) -> int:
        """The number of members trained ``N`` (before any ``keep_best_k`` selection)."""
        return int(self.train_loss.shape[1])

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and Python values (no ensemble): ``torch.save``-able, weights-only."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ensemble"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """The inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)} - {"ensemble"}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def empty(cls, num_members: int) -> History:
        """A history of zero epochs for ``num_members`` members."""
        return cls(
            train_loss=torch.zeros(0, num_members),
            lr=torch.zeros(0, num_members, dtype=torch.float64),
            stopped_epoch=[None] * num_members,
            stop_reason=[None] * num_members,
        )
