"""Engram: distributed memory for language models.

The stable public API, whatever the internal layout:
    from engram import EngramClient, EngramConfig, EngramError, ErrorCode
Names load on first use, so `import engram.decoder...` in a worker does not pull in gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["EngramClient", "EngramConfig", "EngramError", "ErrorCode"]

if TYPE_CHECKING:
    from .coordinator.client import EngramClient
    from .coordinator.config import EngramConfig
    from .errors import EngramError, ErrorCode


def __getattr__(name: str):
    if name == "EngramClient":
        from .coordinator.client import EngramClient

        return EngramClient
    if name == "EngramConfig":
        from .coordinator.config import EngramConfig

        return EngramConfig
    if name in ("EngramError", "ErrorCode"):
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'engram' has no attribute {name!r}")
