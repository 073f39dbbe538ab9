"""`hero registry …`: the registered LoRA versions, and an alias pointed at one by hand (a rollback)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from hero_ml.cli_support import ConfigOption, console, fail, load
from hero_ml.config import alias_problem
from hero_ml.errors import HeroError

if TYPE_CHECKING:  # the module imports no MLflow: `hero --help` stays fast
    from hero_ml.adapters.tracking.registry import AliasHolder

registry_app = typer.Typer(
    help="The model registry: list the LoRA versions, point an alias at one by hand.", no_args_is_help=True
)


@registry_app.command("ls")
def registry_ls(
    limit: Annotated[int, typer.Option(min=1, help="Show the newest LIMIT versions.")] = 20,
    config: ConfigOption = None,
) -> None:
    """The registered model's versions, the newest first: what each was trained on and how it fared,
    which aliases it holds and, for each alias, the version that held it before (where a rollback goes).

    Example: hero registry ls -c production.yaml
    """
    from hero_ml.promotion import open_registry

    resolved = load(config)
    try:
        registry = open_registry(resolved)
        versions = registry.versions()
        if not versions:
            raise fail(registry.what_is_there(registry.name, "no versions"))
        aliases = registry.aliases()
    except HeroError as err:
        raise fail(str(err)) from None
    held: dict[str, list[str]] = {}
    for alias, holder in aliases.items():
        held.setdefault(holder.version, []).append(alias)
    count = f"{len(versions)} version{'s' if len(versions) > 1 else ''}"
    console.print(f"{registry.name}: {count}, newest first", highlight=False, markup=False)
    for version in versions[:limit]:
        number, tags = str(version.version), version.tags  # MLflow's SQL store gives ints
        badges = "".join(f"  @{alias}" for alias in sorted(held.get(number, [])))
        trained = [
            f"run {tags.get('hero.run_id', '?')}",
            tags.get("hero.method", "method ?"),
            *([f"task {tags['hero.task']}"] if "hero.task" in tags else []),
            f"{tags.get('hero.feedbacks', '?')} feedbacks",
            f"base model {tags.get('hero.base_model', '?')}",
        ]
        console.print(
            f"\nversion {number}{badges}  registered {_when(version.creation_timestamp)}\n"
            f"  {', '.join(trained)}\n  {_success(tags)}; {_promotion(tags)}",
            highlight=False,
            markup=False,
        )
    if len(versions) > limit:
        console.print(f"\n({len(versions) - limit} older versions: --limit {len(versions)} shows them)")
    if aliases:
        console.print()
    for alias, holder in sorted(aliases.items()):
        console.print(
            _alias_line(alias, holder, resolved.tracking.champion_alias),
            highlight=False,
            markup=False,
        )


def _when(milliseconds: int | None) -> str:
    if milliseconds is None:
        return ""
    return datetime.fromtimestamp(milliseconds / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _success(tags: dict[str, str]) -> str:
    """The run's success rates on its task, before and after training (toy tasks only)."""
    before, after = (tags.get(f"hero.success_rate.{label}") for label in ("before", "after"))
    if before is None and after is None:
        return "no success rate recorded"
    return f"success rate {before or '?'} -> {after or '?'}"


def _promotion(tags: dict[str, str]) -> str:
    decision = tags.get("hero.promotion.decision")
    if decision is None:
        return "never judged by hero promote"
    against = tags.get("hero.promotion.against", "?")
    rival = "the base model" if against == "base" else f"version {against}"
    return (
        f"{decision} against {rival}: {tags.get('hero.promotion.challenger_rate', '?')} vs "
        f"{tags.get('hero.promotion.incumbent_rate', '?')} ({tags.get('hero.promotion.at', '?')})"
    )


def _alias_line(alias: str, holder: AliasHolder, champion_alias: str) -> str:
    """Who holds `alias`, since when and by what, and the version that held it before."""
    line, record = f"@{alias} -> version {holder.version}", holder.record
    if record is None:
        return f"{line} (moved outside hero, in MLflow's UI or API: no record of the version before)"
    line += f" (by {record.get('by', '?')}, {record.get('moved_at', '?')})"
    if record.get("previous") in (None, "none"):
        return f"{line}; no version held it before"
    option = "" if alias == champion_alias else f" --alias {alias}"
    back = f"`hero registry alias {record['previous']}{option}` goes back"
    return f"{line}; before: version {record['previous']} ({back})"


@registry_app.command("alias")
def registry_alias(
    version: Annotated[int, typer.Argument(min=1, help="The version the alias is to point at.")],
    alias: Annotated[
        str | None, typer.Option(help="The alias (default: tracking.champion_alias, the production one).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Point an alias (default: the champion's) at a version by hand: a decision taken by people, a
    rollback. The move is recorded on the registered model (the version before, when, by hand), and
    `hero registry ls` shows it; models:/NAME@ALIAS loads the version from then on.

    Example, going back to version 3: hero registry alias 3 -c production.yaml
    """
    from hero_ml.promotion import open_registry

    resolved = load(config)
    alias = resolved.tracking.champion_alias if alias is None else alias
    if (problem := alias_problem(alias)) is not None:
        raise fail(f"--alias {alias!r}: {problem}")
    try:
        registry = open_registry(resolved)
        target = registry.version(str(version))
        previous = registry.point_alias(target, alias)
    except HeroError as err:
        raise fail(str(err)) from None
    name = escape(registry.name)
    if previous is not None and previous.version == target.version:
        console.print(f"version {target.version} already holds @{alias}: nothing moved", markup=False)
        return
    before = "nobody" if previous is None else f"version {previous.version}"
    console.print(
        f"[green]moved[/]: @{escape(alias)} of {name}: {before} -> version {target.version} (by hand); "
        f"models:/{name}@{escape(alias)} loads it",
        highlight=False,
    )
    bases = [v.tags.get("hero.base_model") for v in (target, previous) if v is not None]
    if len(bases) == 2 and bases[0] != bases[1]:
        console.print(
            f"note: version {target.version} was trained on the base model {bases[0]!r}, version "
            f"{before.removeprefix('version ')} on {bases[1]!r}: @{alias} now serves another base model",
            highlight=False,
            markup=False,
        )
