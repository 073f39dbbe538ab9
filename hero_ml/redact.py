"""Credentials out of URLs that are shown or published: a URL's user:password@ and the values of
query parameters that carry a secret (?password=, ?token=, ...). Errors and logs show a URL through
`redact`; config refuses a URL with `secret_query_keys`. A known secret echoed back by a server, in
whatever escaping, is masked by `mask_secrets`."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, quote_plus, urlsplit

# query keys whose value is a secret: by name, or by ending (db_password, auth_token, client_secret)
_SECRET_KEY_ENDINGS = (
    "password",
    "passwd",
    "pwd",
    "token",
    "secret",
    "api_key",
    "apikey",
    "credential",
    "signature",
)
_SECRET_KEYS = {"sig", "key", "auth"}  # by name alone: an Azure SAS's sig, an API's ?key=
# user:password@ up to the last @ of the URL: a password may hold '/', '?' or '#' (SQLAlchemy reads
# postgresql://u:pa/ss@db so), where urlsplit takes the first of them as the host's end, and quotes.
# In text (errors, logs) a URL ends at whitespace; a URL alone (a setting) ends at its end: a password
# may hold a space, and an '@' in a path reads as credentials (refused, never published).
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)\S*@")
_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(.*)@", re.DOTALL)
_QUERY_VALUE = re.compile(r"([?&;#]([^=&;\s'\"#]+)=)([^&;\s'\"#]*)")  # '#': a fragment's token=


def _is_secret_key(key: str) -> bool:
    name = key.lower().replace("-", "_")
    return name in _SECRET_KEYS or name.endswith(_SECRET_KEY_ENDINGS)


def redact(text: str) -> str:
    """`text` with every URL's user:password@ shown as …@ and every secret query value as …."""
    text = _USERINFO.sub(r"\1…@", text)
    return _QUERY_VALUE.sub(lambda m: m[1] + "…" if _is_secret_key(m[2]) else m[0], text)


def mask_secrets(text: str, secrets: Iterable[str], mask: str) -> str:
    """`text` with each secret replaced by `mask` in every form an echo of a request may carry it: as
    sent, escaped as JSON (quotes, backslashes, control and non-ASCII characters) or by Python's repr
    (a dict body printed), and URL-encoded. Longest first, so a form is not cut by a shorter one."""
    forms = {
        form
        for secret in secrets
        if secret
        for form in (
            secret,
            json.dumps(secret)[1:-1],
            json.dumps(secret, ensure_ascii=False)[1:-1],
            repr(secret)[1:-1],
            quote(secret, safe=""),
            quote_plus(secret),
        )
    }
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, mask)
    return text


def url_userinfo(url: str) -> str | None:
    """What `url` carries before its host (user, or user:password): all up to its last '@'; None when
    it has none. A check of urlsplit's username and password alone misses a password with '/'."""
    match = _URL_USERINFO.match(url.strip())
    return None if match is None else match[2]


def secret_query_keys(url: str) -> list[str]:
    """The query parameters of `url` whose value is a secret (?password=, ?token=, ...)."""
    return [key for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True) if _is_secret_key(key)]
