"""Prefect flows: they only orchestrate hero_ml (see docs/ARCHITECTURE.md)."""

from collections.abc import Iterator
from contextlib import contextmanager

from hero_ml.errors import HeroError


class PrefectServerError(HeroError, RuntimeError):
    """The Prefect server refused a request; the message names it and what to check."""


def server_problem() -> Exception | None:
    """Why the Prefect server at PREFECT_API_URL cannot be used (its health check); None if it can."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.api_healthcheck()


@contextmanager
def server_refusals() -> Iterator[None]:
    """A request the Prefect server refuses becomes a PrefectServerError naming it, not a traceback:
    a URL that answers its health check but is not Prefect's API, or a server of another version."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        yield
    except PrefectHTTPStatusError as err:
        answer = " ".join(err.response.text.split())[:200]
        raise PrefectServerError(
            f"the Prefect server refused {err.request.method} {err.request.url} "
            f"(HTTP {err.response.status_code}: {answer}); check PREFECT_API_URL and that the server's "
            "Prefect version matches this one's"
        ) from None
