"""``ReduceLROnPlateau`` for each member on its own metric: :class:`MemberReduceLROnPlateau`.

torch's ``ReduceLROnPlateau`` watches one number and lowers every param group's rate at once.
Stepped with the members' mean loss, it couples them: a member that still improves has its
rate cut because others stalled. Here member ``i`` has a torch ``ReduceLROnPlateau`` of its
own, over its own param group of a ``MemberOptimizer(..., groups="member")``, stepped with its
own metric: each member's rate follows exactly what the scheduler would do training it alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ._errors import EnsembleError
from ._optim import MemberOptimizer

__all__ = ["MemberReduceLROnPlateau"]


class _OneGroup(Optimizer):
    """Param group ``index`` of a MemberOptimizer, seen as an optimizer (what a torch
    scheduler reads and writes: ``param_groups``), looked up on each use: loading a state dict
    replaces the group dicts. Never stepped."""

    def __init__(self, owner: MemberOptimizer, index: int) -> None:
        # no Optimizer.__init__: it would register parameters
        self.owner, self.index = owner, index
        self.defaults = {}
        self.state = defaultdict(dict)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [self.owner.optimizer.param_groups[self.index]]


class MemberReduceLROnPlateau:
    """Lower each member's learning rate when its own metric stops improving.

    One ``torch.optim.lr_scheduler.ReduceLROnPlateau`` per member, over that member's param
    group: the same options, the same rule, member ``i``'s rate changed only by member ``i``'s
    metric. ``vensemble.fit`` steps it once per epoch with each member's validation loss (its
    training loss without validation data); a stopped member's scheduler no longer steps.

    Args:
        optimizer: a :class:`~vensemble.MemberOptimizer` built with ``groups="member"``.
        mode, factor, patience, threshold, threshold_mode, cooldown, eps: as for
            ``ReduceLROnPlateau``, shared by every member.
        min_lr: one floor for all members, or one per member.

    Raises:
        EnsembleError: for an optimizer that does not hold one param group per member, or a
            ``min_lr`` list of the wrong length; the options' own errors as torch raises them.

    Example:
        >>> import torch, vensemble as ve
        >>> ens = ve.Ensemble.from_factory(lambda: torch.nn.Linear(4, 1), 2, seed=0)
        >>> opt = ve.MemberOptimizer(torch.optim.SGD, ens, lr=0.1, groups="member")
        >>> sched = ve.MemberReduceLROnPlateau(opt, patience=0, factor=0.5)
        >>> sched.step(torch.tensor([1.0, 1.0]))
        >>> sched.step(torch.tensor([0.5, 2.0]))  # member 1 got worse
        >>> opt.member_lr
        tensor([0.1000, 0.0500], dtype=torch.float64)
    """

    def __init__(
        self,
        optimizer: MemberOptimizer,
        mode: Literal["min", "max"] = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(optimizer, MemberOptimizer):
            raise EnsembleError(
                "MemberReduceLROnPlateau needs a vensemble.MemberOptimizer built with "
                f"groups='member', got {type(optimizer).__name__}"
            )
        groups = optimizer.param_groups
        n = optimizer.num_members
        if [g["members"] for g in groups] != [range(i, i + 1) for i in range(n)]:
            raise EnsembleError(
                "MemberReduceLROnPlateau needs one param group per member: build the "
                "MemberOptimizer with groups='member' (its groups cover members "
                f"{[[g['members'].start, g['members'].stop] for g in groups]})"
            )
        floors = list(min_lr) if isinstance(min_lr, (Sequence, Tensor)) else [min_lr] * n
        if len(floors) != n:
            raise EnsembleError(
                f"min_lr has {len(floors)} values but the ensemble has {n} members; give one "
                "value for all members or exactly one per member"
            )
        self.optimizer = optimizer
        self.schedulers = [
            ReduceLROnPlateau(
                _OneGroup(optimizer, i),
                mode=mode,
                factor=factor,
                patience=patience,
                threshold=threshold,
                threshold_mode=threshold_mode,
                cooldown=cooldown,
                min_lr=float(floor),
                eps=eps,
            )
            for i, floor in enumerate(floors)
        ]

    @property
    def num_members(self) -> int:
        return len(self.schedulers)

    def step(self, metrics: Tensor | Sequence[float], active: Tensor | None = None) -> None:
        """One epoch: member ``i``'s scheduler steps with ``metrics[i]``.

        Args:
            metrics: each member's metric, ``N`` values.
            active: a bool mask ``(N,)`` of the members whose schedulers step (default: all);
                the others keep their state, as a member trained alone would once it stopped.
        """
        values = metrics.tolist() if isinstance(metrics, Tensor) else list(metrics)
        if len(values) != self.num_members:
            raise EnsembleError(
                f"MemberReduceLROnPlateau.step got {len(values)} metrics for "
                f"{self.num_members} members: give one per member"
            )
        steps = [True] * len(values) if active is None else torch.as_tensor(active).tolist()
        for sched, value, stepping in zip(self.schedulers, values, steps):
            if stepping:
                sched.step(value)

    def get_last_lr(self) -> list[float]:
        """Each member's learning rate after the last step."""
        return [float(s.get_last_lr()[0]) for s in self.schedulers]

    def state_dict(self) -> dict[str, Any]:
        """Each member's scheduler state, in member order (plain Python values)."""
        return {"members": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of a scheduler over as many members."""
        states = state_dict.get("members") if isinstance(state_dict, dict) else None
        if not isinstance(states, list) or len(states) != self.num_members:
            got = "no per-member states" if not isinstance(states, list) else len(states)
            raise EnsembleError(
                f"state_dict holds {got} member scheduler states; this scheduler has "
                f"{self.num_members} members"
            )
        for sched, state in zip(self.schedulers, states):
            sched.load_state_dict(state)
