"""Storage keys: relative POSIX paths such as `runs/demo/rounds/3/manifest.json`. A key that could
escape the store's root (absolute, `..`, empty parts, backslashes, control or unicode tricks) is refused."""

from __future__ import annotations

import re

from hero_ml.errors import HeroError

# No leading dot: hidden names are reserved for writes in flight (the local store's temp files).
_SAFE_PART = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]*")  # whole parts: fullmatch


class InvalidKeyError(HeroError, ValueError):
    """A storage key that is not a plain relative path."""


def check_key(key: str) -> str:
    """The key itself when it is a plain relative path of safe parts, else InvalidKeyError."""
    for part in key.split("/"):
        if part in ("", ".", "..") or not _SAFE_PART.fullmatch(part):
            raise InvalidKeyError(
                f"storage key {key!r} is not a plain relative path: part {part!r} must be ASCII "
                "letters, digits, '_', '.', '=' or '-', not starting with '.' (no '..', no leading '/', "
                "no empty parts)"
            )
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a checked key, given with or without its trailing '/'.
    Returned with the trailing '/', so `runs/a` never lists `runs/ab/...`."""
    prefix = prefix.removesuffix("/")
    return "" if prefix == "" else check_key(prefix) + "/"
