"""The one exception type vensemble raises for mistakes a user can make."""

from __future__ import annotations

__all__ = ["EnsembleError"]


class EnsembleError(ValueError):
    """A mistake in how an ensemble is built, called, trained, saved or loaded.

    The message names the member index and the module path, parameter or argument that is
    wrong, and what was expected.
    """
