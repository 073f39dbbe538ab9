"""Artifact storage: one small protocol, a local-directory store (the embedded default) and an S3 store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from hero_ml.adapters.storage.errors import StorageError
from hero_ml.adapters.storage.keys import InvalidKeyError
from hero_ml.adapters.storage.local import LocalStore

if TYPE_CHECKING:
    from hero_ml.config import StorageConfig

__all__ = [
    "ArtifactStore",
    "InvalidKeyError",
    "LocalStore",
    "StorageError",
    "open_store",
]


class ArtifactStore(Protocol):
    def put(self, key: str, data: bytes) -> None:
        """Write an object atomically: a reader sees the old object or the new one, never a part."""

    def create(self, key: str, data: bytes) -> bool:
        """Write the object only if there is none, atomically as put does: True when written, False
        when one was there. Of several processes creating one key at once, exactly one gets True."""

    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when there is none."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` (a key prefix ending at a '/' boundary): key -> size in bytes."""

    def where(self, key: str = "") -> str:
        """Where a key lives, for people: a path or an s3:// URI (never a credential)."""


def open_store(config: StorageConfig) -> ArtifactStore:
    """The store the config selects: the local directory or an S3 bucket."""
    if config.backend == "local":
        return LocalStore(config.local_root)
    from hero_ml.adapters.storage.s3 import S3Store  # boto3 is imported only when S3 is used

    return S3Store.from_config(config)
