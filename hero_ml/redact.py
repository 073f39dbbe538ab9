"""Credentials out of URLs that are shown or published: a URL's user:password@ and the values of
query parameters that carry a secret (?password=, ?token=, ...). Errors and logs show a URL through
`redact`; config refuses a URL with `secret_query_keys`."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

# query keys whose value is a secret: by name, or by ending (db_password, auth_token, client_secret)
_SECRET_KEY_ENDINGS = ("password", "passwd", "pwd", "token", "secret", "api_key", "apikey", "credential")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#@'\"]*@")
_QUERY_VALUE = re.compile(r"([?&;]([^=&;\s'\"#]+)=)([^&;\s'\"#]*)")


def _is_secret_key(key: str) -> bool:
    return key.lower().replace("-", "_").endswith(_SECRET_KEY_ENDINGS)


def redact(text: str) -> str:
    """`text` with every URL's user:password@ shown as …@ and every secret query value as …."""
    text = _USERINFO.sub(r"\1…@", text)
    return _QUERY_VALUE.sub(lambda m: m[1] + "…" if _is_secret_key(m[2]) else m[0], text)


def secret_query_keys(url: str) -> list[str]:
    """The query parameters of `url` whose value is a secret (?password=, ?token=, ...)."""
    return [key for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True) if _is_secret_key(key)]
