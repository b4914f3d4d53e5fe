"""Noticing model surgery cheaply: a process-wide count of module, parameter and buffer
registrations.

``nn.Module`` calls torch's global registration hooks whenever a submodule, parameter or
buffer is assigned or registered (``ens.head = ...``, ``register_parametrization``,
``ModuleList.append``), before storing it. An ensemble compares its module tree with what it
held only when this count moved since its last look: one integer comparison per call instead
of a pass over every module's child dict (8 us on a 6-module MLP once a batched layer has pushed
them out of the CPU's cache).

The count moves on any registration in the process, the ensemble's or not; the next call then
compares the tree once (about 0.5 us). A submodule deleted (``del m.child``, which calls no
hook) shrinks its parent's child dict: each call compares those dicts' lengths too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules import module as _module

__all__ = ["GENERATION"]

GENERATION = [0]  # a list, so that readers hold the one mutable cell


def _bump(*_: Any) -> None:
    # returns None: the registered value is kept as given. Not while dynamo traces: it would
    # guard on the count, and any compiled model that assigns a buffer in its forward would
    # recompile on every call (an ensemble under torch.compile compares its tree each call)
    if not torch.compiler.is_compiling():
        GENERATION[0] += 1


_module.register_module_module_registration_hook(_bump)
_module.register_module_parameter_registration_hook(_bump)
_module.register_module_buffer_registration_hook(_bump)
