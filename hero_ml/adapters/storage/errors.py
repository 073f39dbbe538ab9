"""The storage adapters' error (its own module: both stores raise it, and the package imports them)."""

from hero_ml.errors import HeroError


class StorageError(HeroError, RuntimeError):
    """A storage operation that failed (after the backend's retries); the message names the object."""
