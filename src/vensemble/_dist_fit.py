"""What :func:`vensemble.fit` shares between ranks when it trains a sharded ensemble.

Members need no gradient synchronisation: each rank trains its own block. The ranks meet
once or twice per epoch to gather the members' training and validation rows (for the
history, the progress bar and ``ReduceLROnPlateau``) and whether any member still trains,
and once at the end for the per-member records and ``keep_best_k``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ._errors import EnsembleError
from .ensemble import Ensemble

if TYPE_CHECKING:
    from .distributed import ShardedEnsemble

__all__ = ["MemberSync", "ShardSync", "member_sync"]


class MemberSync:
    """One process: every member is local; nothing is exchanged."""

    first = 0
    main = True

    def __init__(self, total: int) -> None:
        self.total = total

    @property
    def config(self) -> dict[str, Any]:
        """What a checkpoint records about the split (nothing for one process)."""
        return {}

    def rows(self, t: Tensor, what: str) -> Tensor:
        """Every member's row ``(N, ...)`` from this rank's ``(block, ...)``."""
        return t

    def values(self, values: list[Any], what: str) -> list[Any]:
        """Every member's entry of a per-member list."""
        return values

    def path(self, path: Path) -> Path:
        """The checkpoint file of this rank."""
        return path

    def same_data(self, tensors: tuple[Tensor, ...], name: str) -> None:
        """Refuse data that differs between ranks (nothing to check in one process)."""

    def whole(self, ens: Ensemble) -> Any:
        """What ``History.ensemble`` holds after training."""
        return ens

    def kept(self, ens: Ensemble, indices: list[int]) -> Ensemble:
        """The members at global ``indices`` as an ensemble (``keep_best_k``)."""
        return ens.select(indices)


class ShardSync(MemberSync):
    """A rank of a :class:`~vensemble.distributed.ShardedEnsemble`: rows are all-gathered."""

    def __init__(self, shard: ShardedEnsemble) -> None:
        super().__init__(len(shard))
        self.shard = shard
        self.first = shard.start
        self.main = shard.rank == 0

    @property
    def config(self) -> dict[str, Any]:
        return {"members": [self.shard.start, self.shard.stop], "world_size": self.shard.world_size}

    def rows(self, t: Tensor, what: str) -> Tensor:
        return self.shard._comm.all_gather_blocks(t, self.shard.block_sizes, f"fit: {what}")

    def values(self, values: list[Any], what: str) -> list[Any]:
        blocks = self.shard._comm.all_gather_object(values, f"fit: {what}")
        return [v for block in blocks for v in block]

    def path(self, path: Path) -> Path:
        return path.with_name(f"{path.name}.rank{self.shard.rank}-of-{self.shard.world_size}")

    def same_data(self, tensors: tuple[Tensor, ...], name: str) -> None:
        """Every rank must pass the same data: compare shapes, dtypes and two checksums."""
        digests = self.shard._comm.all_gather_object(_digest(tensors), f"fit: compare {name}")
        for r, d in enumerate(digests):
            if not _alike(d, digests[0]):
                raise EnsembleError(
                    f"{name} differs between ranks: rank {r}'s is not rank 0's ({d} vs "
                    f"{digests[0]}). Every rank must pass the same data (seed the code that "
                    "makes it alike on every rank): each member's batches are drawn from it"
                )

    def whole(self, ens: Ensemble) -> Any:
        return self.shard

    def kept(self, ens: Ensemble, indices: list[int]) -> Ensemble:
        return self.shard.to_ensemble(indices)


def _digest(tensors: tuple[Tensor, ...]) -> list[tuple[Any, ...]]:
    out = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()  # (numel,)
        weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) % 1009 + 1
        out.append((tuple(t.shape), str(t.dtype), float(flat.sum()), float((flat * weights).sum())))
    return out


def _alike(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    """Equal shapes and dtypes; checksums equal up to the reduction order (another GPU)."""
    if [x[:2] for x in a] != [x[:2] for x in b]:
        return False
    sums = [(u, v) for x, y in zip(a, b) for u, v in zip(x[2:], y[2:])]
    return all(abs(u - v) <= 1e-9 * max(abs(u), abs(v), 1.0) for u, v in sums)


def member_sync(ens: Any) -> tuple[Ensemble, MemberSync]:
    """The ensemble ``fit`` trains in this process, and how its ranks share the rest.

    A :class:`~vensemble.distributed.ShardedEnsemble` trains its local block; anything else
    is returned as it is (``fit`` refuses what is not an ``Ensemble``).
    """
    from .distributed import ShardedEnsemble

    if isinstance(ens, ShardedEnsemble):
        return ens.local, ShardSync(ens)
    return cast(Ensemble, ens), MemberSync(len(ens) if isinstance(ens, Ensemble) else 0)
