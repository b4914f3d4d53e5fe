"""Ways to run a stacked ensemble: ``loop`` (the reference), ``vmap`` and ``auto``."""

from __future__ import annotations

from ._call import Call as Call
from .loop import loop_forward as loop_forward
from .select import AutoPlan as AutoPlan
from .select import FallbackWarning as FallbackWarning
from .select import auto_forward as auto_forward
from .select import strict_vmap_forward as strict_vmap_forward
from .vmap import vmap_forward as vmap_forward

BACKENDS = ("auto", "fused", "vmap", "loop")

__all__ = [
    "BACKENDS",
    "AutoPlan",
    "Call",
    "FallbackWarning",
    "auto_forward",
    "loop_forward",
    "strict_vmap_forward",
    "vmap_forward",
]
