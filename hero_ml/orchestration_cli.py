"""`hero deploy`, `hero serve-webhooks` and `hero rounds poll`: running HERO on a Prefect server.

These commands hand off to flows/ (imported when called: hero_ml itself never imports Prefect). They
need PREFECT_API_URL pointing at the server (docs/OPERATIONS.md).
"""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.table import Table
from rich.text import Text

from hero_ml.cli_support import ConfigOption, console, fail, load
from hero_ml.redact import redact

rounds_app = typer.Typer(help="Rounds waiting for annotators on a Prefect server.", no_args_is_help=True)


def _need_prefect_server() -> None:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise fail(
            "no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api; "
            "infra/prefect-server.sh start runs one)"
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parsed lazily: a bad port raises here)
    except ValueError as err:
        raise fail(
            f"PREFECT_API_URL {redact(url)} is not a URL ({err}): e.g. http://127.0.0.1:4200/api"
        ) from None
    url = redact(url)  # credentials are not to be printed
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail(f"PREFECT_API_URL {url} is not an http(s) URL: e.g. http://127.0.0.1:4200/api")
    if "/api" not in parts.path:  # the server's address without its API's path: a common slip
        raise fail(f"PREFECT_API_URL {url} names no API path: add it, e.g. {url.rstrip('/')}/api")
    from flows import server_problem

    # without it, each command's first call would end in the HTTP client's traceback
    if (problem := server_problem()) is not None:
        raise fail(
            f"the Prefect server at {url} fails its health check "
            f"({redact(str(problem)) or type(problem).__name__}): "
            "start it (infra/prefect-server.sh start) or set PREFECT_API_URL"
        )


def deploy(
    gpu_pool: Annotated[
        str | None, typer.Option(help="Work pool of GPU work (default: orchestration.work_pool).")
    ] = None,
    pool_type: Annotated[
        str | None,
        typer.Option(
            help="GPU pool type: process (workers on GPU machines), docker or kubernetes (default: an "
            "existing pool's, else process)."
        ),
    ] = None,
    service_pool: Annotated[
        str, typer.Option(help="Work pool of the round poller (no GPU).")
    ] = "hero-services",
    gpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="GPUs of the GPU pool (or its GPU-group workers): runs at once (without the option: an "
            "existing pool's limit is kept, a new pool gets 1).",
        ),
    ] = None,
    training_cron: Annotated[
        str | None,
        typer.Option(
            help="Also train on this cron schedule (UTC), e.g. '0 2 * * 1'; 'off' removes the schedule "
            "(without the option, one deployed before is kept)."
        ),
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Where workers find flows/ (default: this checkout).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create (or update) the work pools and every HERO deployment on the Prefect server."""
    from flows import PrefectServerError, server_refusals
    from flows.deploy import (
        POOL_TYPES,
        TRAINING_CRON_OFF,
        DeployError,
        DeployPlan,
        cron_problem,
        deploy,
        ensure_pool,
    )

    if pool_type is not None and pool_type not in POOL_TYPES:
        raise fail(f"--pool-type {pool_type!r}: choose one of {', '.join(POOL_TYPES)}")
    if training_cron not in (None, TRAINING_CRON_OFF) and (problem := cron_problem(training_cron)):
        raise fail(
            f"--training-cron {training_cron!r}: {problem}; give five fields (minute hour day-of-month "
            "month day-of-week), e.g. '0 2 * * 1' for Mondays at 02:00"
        )
    # a git URL (scp-style too) is Prefect's to fetch; a path must hold the flows here
    remote = "://" in (source or "") or re.match(r"[\w.-]+@[\w.-]+:", source or "")
    if source is not None and not remote and not (Path(source) / "flows").is_dir():
        raise fail(
            f"--source {source}: no flows/ folder there; Prefect reads the flows at that path when "
            "deploying, so deploy where it exists (inside the worker image, as the compose stack does)"
        )
    resolved = load(config)  # a config to fix is said before the server is asked
    _need_prefect_server()
    plan = DeployPlan(
        gpu_pool=gpu_pool or resolved.orchestration.work_pool,
        gpu_pool_type=pool_type,
        service_pool=service_pool,
        gpus=gpus,
        poll_interval_s=resolved.orchestration.poll_interval_s,
        training_cron=training_cron,
        **({"source": source} if source else {}),
    )
    pools = ((plan.gpu_pool, plan.gpu_pool_type, plan.gpus, 1), (plan.service_pool, "process", None, None))
    table = Table("deployment", "id", title="deployments")
    try:
        with server_refusals():
            for pool, asked, given, new_limit in pools:
                created, kind, limit = ensure_pool(pool, given, asked, new_limit)
                console.print(
                    f"work pool {pool} ({kind}): {'created' if created else 'exists'} "
                    f"(concurrency {limit or 'any'})"
                )
            deployed, notes = deploy(plan)
            for name, deployment_id in deployed.items():
                table.add_row(name, str(deployment_id))
    except (PrefectServerError, DeployError) as err:
        raise fail(str(err)) from None
    console.print(table)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    console.print(
        f"start workers: prefect worker start --pool {plan.gpu_pool} on each GPU machine and --pool "
        f"{plan.service_pool} for the services (on this machine: infra/prefect-worker.sh start "
        f"{plan.gpu_pool}; docs/OPERATIONS.md); run: prefect deployment run hero-training/on-demand "
        "--param run_id=NAME",
        highlight=False,
    )


def serve_webhooks(
    host: Annotated[
        str, typer.Option(help="Address to bind (loopback unless you mean otherwise).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    config: ConfigOption = None,
) -> None:
    """Receive Label Studio's annotation events and resume the rounds they complete.

    Needs orchestration.webhook_secret (Label Studio sends it in a header) and the same storage and
    Label Studio settings as the workers."""
    resolved = load(config)
    secret = resolved.orchestration.webhook_secret
    if secret is None:
        raise fail("set HERO_ORCHESTRATION__WEBHOOK_SECRET: the receiver accepts only events that carry it")
    listening = _listening_socket(host, port)
    with listening:  # closed too where a check below fails
        _need_prefect_server()
        import uvicorn

        from flows.waiting import RoundResumer
        from flows.webhooks import create_app
        from hero_ml.labelling import LabelStudioError

        try:
            resumer = RoundResumer(resolved)
        except LabelStudioError as err:
            raise fail(str(err)) from None
        console.print(
            f"receiving Label Studio webhooks at http://{host}:{port}/webhooks/label-studio", highlight=False
        )
        server = uvicorn.Server(uvicorn.Config(create_app(resumer.resume_if_ready, secret), log_level="info"))
        server.run(sockets=[listening])


def _listening_socket(host: str, port: int) -> socket.socket:
    """The socket the receiver serves on, bound before anything else is asked (uvicorn would say a
    bad address only after the server started, in its own words)."""
    try:
        family, *_ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror as err:
        raise fail(f"--host {host!r}: not an address or a known host name ({err.strerror})") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise fail(
                f"--port {port}: already in use on {host} (another serve-webhooks?): pick another"
            ) from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise fail(f"--host {host!r}: not an address of this machine: bind one of its own") from None
        raise fail(f"--host {host!r} --port {port}: cannot listen there ({err.strerror})") from None


@rounds_app.command("poll")
def poll(config: ConfigOption = None) -> None:
    """Check every suspended training run once and resume those whose round may close (what the
    hero-poll-rounds deployment does on its schedule)."""
    resolved = load(config)
    _need_prefect_server()
    from flows import PrefectServerError, server_refusals
    from flows.waiting import RoundResumer
    from hero_ml.labelling import LabelStudioError

    try:
        with server_refusals():
            results = RoundResumer(resolved).poll()
    except (LabelStudioError, PrefectServerError) as err:
        raise fail(str(err)) from None
    table = Table("flow run", "run", "round", "resumed", "why", title="suspended training runs")
    for item in results:
        table.add_row(  # Text: the reason may quote annotators' or a server's text, never markup
            item.flow_run_id,
            Text(item.run_id or "—"),
            str(item.round),
            "yes" if item.resumed else "no",
            Text(item.reason),
        )
    console.print(table)
