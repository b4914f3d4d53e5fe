"""vensemble: run and train many same-architecture PyTorch models as one."""

from __future__ import annotations

from . import metrics as metrics
from ._errors import EnsembleError as EnsembleError
from ._state import fingerprint as fingerprint
from .backends import FallbackWarning as FallbackWarning
from .compat import combine_state_for_ensemble as combine_state_for_ensemble
from .compat import vmap as vmap
from .ensemble import Ensemble as Ensemble
from .mixed import MixedEnsemble as MixedEnsemble

__version__ = "0.1.0"

__all__ = [
    "Ensemble",
    "EnsembleError",
    "FallbackWarning",
    "MixedEnsemble",
    "__version__",
    "combine_state_for_ensemble",
    "fingerprint",
    "metrics",
    "vmap",
]
