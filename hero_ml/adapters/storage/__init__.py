"""Artifact storage: one small protocol and its implementations (the local directory for now)."""

from __future__ import annotations

from typing import Protocol

from hero_ml.adapters.storage.keys import InvalidKeyError, check_key
from hero_ml.adapters.storage.local import LocalStore

__all__ = ["ArtifactStore", "InvalidKeyError", "LocalStore", "check_key"]


class ArtifactStore(Protocol):
    def put(self, key: str, data: bytes) -> None:
        """Write an object atomically: a reader sees the old object or the new one, never a part."""

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when there is none."""

    def exists(self, key: str) -> bool: ...
