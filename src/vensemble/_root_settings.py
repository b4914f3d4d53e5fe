"""The members' root settings read and written through a module that holds ensembles."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .ensemble import Ensemble

__all__ = ["RootSettings"]


def _same(a: Any, b: Any) -> bool:
    """Whether two blocks' values of a setting are the same (an array's == is no answer)."""
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # (NaN, in both)
    try:
        return bool(a == b)
    except Exception:  # (an array with several values: ambiguous)
        return False


class RootSettings(nn.Module):
    """A module over blocks of members (``Ensemble``\\ s) that reads and writes the members'
    plain settings on their root module as an ``Ensemble`` does (see there), in every block
    whose members have one: ``m.temperature = 0.5`` sets (``del`` deletes) each such member's;
    reading it gives the value they share, or names the blocks that differ."""

    # how the blocks are named in messages: "the {_BLOCKS} [0, 1] hold ..., read it from
    # {_BLOCK}[0]", and the attribute they are kept under
    _BLOCKS = "blocks"
    _BLOCK = "m.blocks"

    def _setting_blocks(self) -> list[Ensemble]:
        """The blocks, in order (none while the module is being built)."""
        raise NotImplementedError

    def _holding(self, name: str) -> list[Ensemble]:
        """The blocks whose members have ``name`` as a root setting (none for a name of this
        module's own)."""
        if name in self.__dict__ or hasattr(type(self), name):
            return []
        return [b for b in self._setting_blocks() if b._has_root_setting(name)]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            holding = self._holding(name)
            if not holding:
                raise
        values = [getattr(block, name) for block in holding]
        if not all(_same(v, values[0]) for v in values[1:]):
            ks = [k for k, block in enumerate(self._setting_blocks()) if block in holding]
            raise AttributeError(
                f"the {self._BLOCKS} {ks} hold different values of the members' setting "
                f"{name!r} ({', '.join(map(repr, values))}): read it from one "
                f"({self._BLOCK}[{ks[0]}].{name})"
            )
        return values[0]

    def __setattr__(self, name: str, value: Any) -> None:
        holding = self._holding(name)
        if not holding:
            super().__setattr__(name, value)
        for block in holding:
            setattr(block, name, value)

    def __delattr__(self, name: str) -> None:
        holding = self._holding(name)
        if not holding:
            super().__delattr__(name)
        for block in holding:
            delattr(block, name)

    def __dir__(self) -> list[str]:
        own = set(super().__dir__())
        blocks = self._setting_blocks()
        return sorted(own | {k for b in blocks for k in dir(b) if b._has_root_setting(k)})
