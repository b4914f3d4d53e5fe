"""MixedEnsemble: members of several architectures, each architecture run as one Ensemble."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ._errors import EnsembleError
from ._root_settings import RootSettings
from ._state import check_no_shared_memory, fingerprint, fingerprint_digest
from .ensemble import Ensemble

__all__ = ["MixedEnsemble"]

_MEMBER = re.compile(r"\bmember (\d+)\b")  # how EnsembleError messages name a member


def _renumbered(message: str, indices: list[int]) -> str:
    """``message`` with each "member k" of a group named by its index in the whole list."""
    return _MEMBER.sub(lambda m: f"member {indices[int(m.group(1))]}", message)


def _take(arg: Any, dim: int, index: Tensor) -> Any:
    """The members at ``index`` of every tensor in ``arg`` (member dim ``dim``)."""
    return pytree.tree_map_only(Tensor, lambda t: t.index_select(dim, index.to(t.device)), arg)


class MixedEnsemble(RootSettings):
    """Members of several architectures, grouped by architecture and run group by group.

    Members with the same architecture fingerprint form one :class:`Ensemble` (run fused or
    vectorized); outputs come back in the original member order, stacked along a new dim 0.
    All members must return outputs of one shape and structure.

    Args:
        models: the members, in the order their outputs should have.
        **kwargs: options for each group's :class:`Ensemble` (``backend``, ``randomness``, ...).

    Example:
        >>> from torch import nn
        >>> models = [nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Linear(4, 2)]
        >>> mixed = MixedEnsemble(models)
        >>> mixed(torch.randn(5, 4)).shape, [len(g) for g in mixed.groups]
        (torch.Size([3, 5, 2]), [2, 1])
    """

    def __init__(self, models: Iterable[nn.Module], **kwargs: Any) -> None:
        super().__init__()
        members = list(models)
        if not members:
            raise EnsembleError("a MixedEnsemble needs at least one member; got an empty sequence")
        by_arch: dict[str, list[int]] = {}
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise EnsembleError(f"member {i} is a {type(m).__name__}, expected an nn.Module")
            by_arch.setdefault(fingerprint_digest(fingerprint(m)), []).append(i)
        self.indices: list[list[int]] = list(by_arch.values())
        groups = []
        for idx in self.indices:
            try:
                groups.append(Ensemble([members[i] for i in idx], **kwargs))
            except EnsembleError as err:  # its members are numbered within the group
                raise EnsembleError(_renumbered(str(err), idx)) from None
        check_no_shared_memory(members)  # across groups too: each group copies its members
        self.groups = nn.ModuleList(groups)
        order = [i for idx in self.indices for i in idx]
        self._inverse = torch.empty(len(order), dtype=torch.long)
        self._inverse[torch.tensor(order)] = torch.arange(len(order))

    def __len__(self) -> int:
        return len(self._inverse)

    # The members' plain settings on their root module, in every group whose members have
    # one (see RootSettings): ``mixed.temperature = 0.5``
    _BLOCKS = "architecture groups"
    _BLOCK = "mixed.groups"

    def _setting_blocks(self) -> list[Ensemble]:
        groups = self.__dict__.get("_modules", {}).get("groups")
        return [] if groups is None else [g for g in groups if isinstance(g, Ensemble)]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise EnsembleError(f"member index {i} is out of range for an ensemble of {n}")
        i %= n
        for g, idx in enumerate(self.indices):
            if i in idx:
                return g, idx.index(i)
        raise AssertionError("unreachable")  # pragma: no cover

    def member(self, i: int) -> nn.Module:
        """A standalone module with member ``i``'s current weights and buffers (a copy)."""
        g, j = self._locate(i)
        group = self.groups[g]
        assert isinstance(group, Ensemble)
        return group.member(j)

    def unstack(self) -> list[nn.Module]:
        """All members as standalone modules, in the original order."""
        return [self.member(i) for i in range(len(self))]

    def forward(self, *args: Any, in_dims: Any = None, **kwargs: Any) -> Any:
        """Run every member; ``in_dims`` and keyword arguments as in :meth:`Ensemble.forward`."""
        dims = in_dims if isinstance(in_dims, (tuple, list)) else (in_dims,) * len(args)
        if len(dims) != len(args):
            raise EnsembleError(
                f"in_dims has {len(dims)} entries but {len(args)} positional arguments were given"
            )
        outputs = []
        for idx, group in zip(self.indices, self.groups):
            index = torch.tensor(idx)
            sliced = tuple(a if d is None else _take(a, d, index) for a, d in zip(args, dims))
            outputs.append(group(*sliced, in_dims=in_dims, **kwargs))
        flat = [pytree.tree_flatten(o) for o in outputs]
        spec = flat[0][1]
        for k, (_, other) in enumerate(flat[1:], start=1):
            if other != spec:
                raise EnsembleError(
                    f"architecture group {k} (members {self.indices[k]}) returns a different output "
                    f"structure from group 0 (members {self.indices[0]}): {other} vs {spec}"
                )
        leaves = []
        for column in zip(*(f[0] for f in flat)):
            shapes = {tuple(t.shape[1:]) for t in column}
            if len(shapes) > 1:
                raise EnsembleError(
                    f"the architecture groups return outputs of different shapes {sorted(shapes)}; "
                    "a MixedEnsemble stacks outputs, so every member must return one shape"
                )
            cat = torch.cat(column)
            leaves.append(cat.index_select(0, self._inverse.to(cat.device)))
        return pytree.tree_unflatten(leaves, spec)
