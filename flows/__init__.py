"""Prefect flows: they only orchestrate hero_ml (see docs/ARCHITECTURE.md)."""


def server_problem() -> Exception | None:
    """Why the Prefect server at PREFECT_API_URL cannot be used (its health check); None if it can."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.api_healthcheck()
