"""Per-member training data: the same batches for all, a shuffle per member, or bagging."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ._errors import EnsembleError

__all__ = ["DATA_MODES", "MemberBatches", "as_tensors"]

DATA_MODES = ("shared", "shuffle", "bootstrap")


def as_tensors(data: Any, name: str) -> tuple[Tensor, ...]:
    """``(inputs..., targets)`` as a tuple of tensors with one leading sample size.

    Accepts a tuple or list of tensors or a ``torch.utils.data.TensorDataset``.
    """
    tensors = getattr(data, "tensors", data)  # TensorDataset
    if not isinstance(tensors, (tuple, list)) or len(tensors) < 2:
        raise EnsembleError(
            f"{name} must be a tuple (inputs, targets) of tensors or a TensorDataset, got "
            f"{type(data).__name__}"
        )
    for k, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.ndim == 0:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise EnsembleError(f"{name}[{k}] must be a tensor with a sample dim, got {got}")
    sizes = [t.shape[0] for t in tensors]
    if len(set(sizes)) != 1 or sizes[0] == 0:
        shapes = [tuple(t.shape) for t in tensors]
        raise EnsembleError(
            f"{name}'s tensors must share one non-zero leading (sample) size, got shapes {shapes}"
        )
    return tuple(tensors)


class MemberBatches:
    """Which samples each member sees at each step, drawn from one seeded generator.

    Modes:
        ``"shared"``: one shuffle per epoch; every member sees the same batches
            (indices of shape ``(b,)``).
        ``"shuffle"``: an independent shuffle per member and epoch (indices ``(N, b)``).
        ``"bootstrap"``: bagging. Each member draws ``n`` samples with replacement once (its
            bootstrap sample, :attr:`bootstrap`), then shuffles it every epoch (indices
            ``(N, b)``).

    Every epoch has ``ceil(n / batch_size)`` steps; the last batch may be smaller.

    Member ``i``'s draws depend only on ``i`` and the generator's seed: a sampler for the
    block ``first_member, ..., first_member + num_members - 1`` of ``total_members`` (one
    rank of a :class:`vensemble.distributed.ShardedEnsemble`) gives exactly those rows of
    the whole ensemble's sampler (it draws every member's keys and keeps its own rows, a
    bounded number at a time, so its generator stays in step with the whole's).

    Args:
        mode: one of :data:`DATA_MODES`.
        num_samples: the number of training samples ``n``.
        num_members: ``N``.
        batch_size: samples per member per step.
        generator: the CPU generator all draws come from (its state is the sampler's state).
        bootstrap: a bootstrap sample to reuse ``(num_members, n)`` (when resuming).
        first_member: the global index of this sampler's first member.
        total_members: the whole ensemble's member count (``None``: ``num_members``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> batches = MemberBatches("shuffle", 5, num_members=3, batch_size=2, generator=g)
        >>> [tuple(idx.shape) for idx in batches.epoch()]
        [(3, 2), (3, 2), (3, 1)]
    """

    def __init__(
        self,
        mode: str,
        num_samples: int,
        num_members: int,
        batch_size: int,
        generator: torch.Generator,
        bootstrap: Tensor | None = None,
        first_member: int = 0,
        total_members: int | None = None,
    ) -> None:
        total = num_members if total_members is None else total_members
        if not 0 <= first_member <= total - num_members:
            raise EnsembleError(
                f"members {first_member}..{first_member + num_members - 1} are not inside an "
                f"ensemble of {total} members"
            )
        if mode not in DATA_MODES:
            raise EnsembleError(f"data_mode must be one of {DATA_MODES}, got {mode!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise EnsembleError(f"batch_size must be a positive int, got {batch_size!r}")
        self.mode = mode
        self.n = num_samples
        self.num_members = num_members
        self.batch_size = batch_size
        self.generator = generator
        self.first_member, self.total_members = first_member, total
        self.bootstrap: Tensor | None = None
        if mode == "bootstrap":
            if bootstrap is None:  # (N, n): member i's bootstrap sample
                bootstrap = self._rows(
                    lambda rows: torch.randint(
                        0, num_samples, (rows, num_samples), generator=generator
                    )
                )
            self.bootstrap = bootstrap

    def _rows(self, draw: Callable[[int], Tensor]) -> Tensor:
        """This block's rows of ``draw(total_members)`` (``draw(rows)`` makes ``(rows, n)``).

        CPU draws are sequential, so drawing ``a`` rows then ``b`` rows equals drawing
        ``a + b``: the rows of other members are drawn (a bounded number at a time) and dropped.
        """
        first, count, total = self.first_member, self.num_members, self.total_members
        if first == 0 and count == total:
            return draw(total)
        step = max(1, (1 << 22) // max(self.n, 1))  # rows per throw-away draw: <= 16 MiB

        def skip(rows: int) -> None:
            for s in range(0, rows, step):
                draw(min(step, rows - s))

        skip(first)
        mine = draw(count)
        skip(total - first - count)
        return mine

    @property
    def per_member(self) -> bool:
        """Whether each member gets its own batch (indices ``(N, b)``) rather than a shared one."""
        return self.mode != "shared"

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def _order(self) -> Tensor:
        if self.mode == "shared":
            return torch.randperm(self.n, generator=self.generator)  # (n,)
        keys = self._rows(lambda rows: torch.rand(rows, self.n, generator=self.generator))
        order = keys.argsort(dim=1, stable=True)  # (N, n): a permutation per member
        if self.bootstrap is not None:
            return self.bootstrap.gather(1, order)  # (N, n): the member's sample, shuffled
        return order

    def epoch(self, device: torch.device | None = None) -> Iterator[Tensor]:
        """One epoch's sample indices, step by step: ``(b,)`` shared or ``(N, b)`` per member."""
        order = self._order()
        if device is not None:
            order = order.to(device)
        for start in range(0, self.n, self.batch_size):
            yield order[..., start : start + self.batch_size]
