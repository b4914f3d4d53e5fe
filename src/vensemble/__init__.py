"""vensemble: run and train many same-architecture PyTorch models as one."""

from __future__ import annotations

from . import metrics as metrics
from ._errors import EnsembleError as EnsembleError
from ._state import fingerprint as fingerprint
from .backends import FallbackWarning as FallbackWarning
from .compat import combine_state_for_ensemble as combine_state_for_ensemble
from .compat import vmap as vmap
from .ensemble import Ensemble as Ensemble
from .io import export as export
from .io import from_checkpoints as from_checkpoints
from .io import load as load
from .io import save as save
from .mixed import MixedEnsemble as MixedEnsemble
from .train import History as History
from .train import MemberOptimizer as MemberOptimizer
from .train import MemberReduceLROnPlateau as MemberReduceLROnPlateau
from .train import clip_grad_norm_ as clip_grad_norm_
from .train import fit as fit
from .train import member_loss as member_loss

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "EnsembleError",
    "FallbackWarning",
    "History",
    "MemberOptimizer",
    "MemberReduceLROnPlateau",
    "MixedEnsemble",
    "__version__",
    "clip_grad_norm_",
    "combine_state_for_ensemble",
    "export",
    "fingerprint",
    "fit",
    "from_checkpoints",
    "load",
    "member_loss",
    "metrics",
    "save",
    "vmap",
]
