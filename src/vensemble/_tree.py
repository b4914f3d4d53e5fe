"""Noticing model surgery cheaply: a process-wide count of module, parameter and buffer
registrations.

``nn.Module`` calls torch's global registration hooks whenever a submodule, parameter or
buffer is assigned or registered (``ens.head = ...``, ``register_parametrization``,
``ModuleList.append``), before storing it. An ensemble compares its module tree with what it
held only when this count moved since its last look: one integer comparison per call instead
of a pass over every module's child dict (8 us on a 6-module MLP once a batched layer has pushed
them out of the CPU's cache). Deleting a submodule (``del m.child``) calls no hook.

The count moves on any registration in the process, the ensemble's or not; the next call then
compares the tree once (about 0.5 us).
"""

from __future__ import annotations

from typing import Any

from torch.nn.modules import module as _module

__all__ = ["GENERATION"]

GENERATION = [0]  # a list, so that readers hold the one mutable cell


def _bump(*_: Any) -> None:
    GENERATION[0] += 1  # returns None: the registered value is kept as given


_module.register_module_module_registration_hook(_bump)
_module.register_module_parameter_registration_hook(_bump)
_module.register_module_buffer_registration_hook(_bump)
