"""CogAlign command line, workspace management and lineage (orchestration side: Prefect + DVC)."""

from cogalign_core import __version__

__all__ = ["__version__"]
