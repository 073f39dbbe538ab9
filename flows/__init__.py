"""Prefect flows: they only orchestrate hero_ml (see docs/ARCHITECTURE.md)."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hero_ml.errors import HeroError
from hero_ml.redact import redact


class PrefectServerError(HeroError, RuntimeError):
    """The Prefect server refused a request; the message names it and what to check."""


def server_problem() -> Exception | None:
    """Why the Prefect server at PREFECT_API_URL cannot be used (its health check); None if it can."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.api_healthcheck()


def ephemeral_server_stopper() -> Callable[[], None]:
    """A function that stops the temporary Prefect API server of ephemeral mode, if this process
    started one. A process that ends with os._exit skips Prefect's atexit stop, and the server (a child
    process) would outlive it, holding its port; killed, not asked: the runs are crash-safe, and so is
    its SQLite file. What it needs is imported now: it runs in a signal handler, which must not import
    (the signal may come in the middle of an import, whose lock it would wait on for ever)."""
    from prefect.server.api.server import SubprocessASGIServer

    def stop() -> None:
        server = SubprocessASGIServer()  # the ephemeral server is the instance of no fixed port
        if server.server_process is not None:
            server.server_process.kill()
            server.server_process.wait()

    return stop


@contextmanager
def server_refusals() -> Iterator[None]:
    """A request the Prefect server refuses becomes a PrefectServerError naming it, not a traceback:
    a URL that answers its health check but is not Prefect's API, or a server of another version."""
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        yield
    except HeroError:  # ours (a ConfigError is a ValueError too): said as it is
        raise
    except PrefectHTTPStatusError as err:
        answer = " ".join(err.response.text.split())[:200]
        raise PrefectServerError(
            f"the Prefect server refused {err.request.method} {redact(str(err.request.url))} "
            f"(HTTP {err.response.status_code}: {redact(answer)}); check PREFECT_API_URL and that the "
            "server's Prefect version matches this one's"
        ) from None
    except ValueError as err:  # a 200 that is not Prefect's: HTML (JSON decode), other JSON (pydantic)
        raise PrefectServerError(
            f"the server at PREFECT_API_URL answered, but not as Prefect's API does ({type(err).__name__}: "
            f"{redact(str(err).splitlines()[0])[:200]}); check PREFECT_API_URL"
        ) from None
