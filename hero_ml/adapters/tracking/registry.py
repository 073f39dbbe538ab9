"""The model registry: LoRAs as versions of an MLflow registered model, promotion by alias.

A version is MLflow's diffusers flavour: the adapter weights (diffusers format) plus a reference to
the base model, never a copy of it. `mlflow.pyfunc.load_model("models:/NAME@champion")` generates
images with plain diffusers; `load_version` here loads the same weights onto our pipeline loader
(which also knows `toy` and `random:<arch>` sources) for evaluation and `hero generate`.

Promotion moves the champion alias to a challenger only when it beats the champion (or, with no
champion yet, the base model) by a margin on a fixed evaluation; every decision and its figures are
recorded as tags of the challenger version. A person may point an alias at a version by hand
(`point_alias`: a decision taken otherwise, a rollback). Every move of an alias by either is recorded
as tags of the registered model (`aliases`): the version it moved to and the one that held it
before, when, and by what; a move made elsewhere (MLflow's UI) leaves a record that no longer names
the holder.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow.diffusers
import yaml
from diffusers import StableDiffusionPipeline
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from sqlalchemy.exc import SQLAlchemyError

from hero_ml.adapters.tracking import NOISE_POOL_ARTIFACT, unreachable
from hero_ml.config import MODEL_URI, ModelConfig, model_uri_problem
from hero_ml.diffusion.lora import LORA_WEIGHTS_FILE, load_lora
from hero_ml.diffusion.pipeline import DTYPES, TOY_FOLDER, TOY_SOURCE, load_pipeline, weights_sha256
from hero_ml.errors import HeroError
from hero_ml.guidance import NoisePool

__all__ = [
    "BASE_MODEL_TAG",
    "ModelVersion",
    "PromotionDecision",
    "Registry",
    "RegistryError",
    "save_lora_model",
]

MODEL_ARTIFACT = "lora"  # the run artifact holding the diffusers-flavour model
ROUND_TAG = "hero.rounds"  # rounds the LoRA learned: with the MLflow run, names a version uniquely
BASE_MODEL_TAG = "hero.base_model"  # model.source the LoRA was trained on
METHOD_TAG = "hero.method"  # hero | hero-noguide | ddpo-binary | d3po: method hero leaves a noise pool
# MLmodel metadata: the base model as trained on, which `Registry.load` loads again
BASE_MODEL_KEY = "hero_base_model"  # model.source as configured (e.g. "toy")
BASE_DTYPE_KEY = "hero_base_model_dtype"  # model.dtype: its weights' fingerprint depends on it
BASE_SEED_KEY = "hero_base_model_seed"  # model.seed: what a random:<arch> source is built from
BASE_WEIGHTS_KEY = "hero_base_model_sha256"  # its weights_sha256 (absent: logged before it was kept)


class RegistryError(HeroError, RuntimeError):
    """A registry request that cannot be served; the message says what is missing or wrong."""


def save_lora_model(
    lora_folder: Path, base: ModelConfig, out: Path, base_weights: dict[str, str] | None = None
) -> None:
    """Write the diffusers-flavour MLflow model of a saved LoRA to `out`.

    The flavour's base model must be something `DiffusionPipeline.from_pretrained` resolves, so the
    toy model is referenced by its folder; the base as configured (source, dtype, seed) travels in the
    metadata, and so does base_weights (pipeline.weights_sha256 of the base it was trained on), which
    `Registry.load` compares."""
    metadata: dict[str, object] = {
        BASE_MODEL_KEY: base.source,
        BASE_DTYPE_KEY: base.dtype,
        BASE_SEED_KEY: base.seed,
    }
    if base_weights is not None:
        metadata[BASE_WEIGHTS_KEY] = base_weights
    mlflow.diffusers.save_model(
        adapter_path=str(lora_folder),
        path=str(out),
        base_model=str(TOY_FOLDER) if base.source == TOY_SOURCE else base.source,
        metadata=metadata,
    )


_HTTP_FAILURE = re.compile(
    r"(API request to endpoint \S+ failed with error code \d+ != 200)\. Response body: '(.*)'", re.DOTALL
)


def mlflow_message(err: MlflowException) -> str:
    """MLflow's message, but an HTML page it quotes (a web server at the tracking URI that is not
    MLflow's, a proxy's error page) summed up in a line instead of printed whole."""
    match = _HTTP_FAILURE.match(err.message)
    if match is None or not match[2].lstrip().startswith("<"):
        return err.message
    title = re.search(r"<title>\s*(.*?)\s*</title>", match[2], re.IGNORECASE | re.DOTALL)
    page = f"an HTML page ({title[1]!r})" if title else "an HTML page"
    return (
        f"{match[1]}: the answer was {page}, not MLflow's JSON; the server at the tracking URI is not "
        "an MLflow tracking server (or a proxy in front of it failed): check tracking.tracking_uri "
        "(HERO_TRACKING__TRACKING_URI)"
    )


def open_client(tracking_uri: str) -> MlflowClient:
    """MLflow's client on `tracking_uri`, its store opened (MLflow opens it at once): a store that
    cannot open is said in a line, with the fix."""
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except ImportError as err:  # postgresql://, mysql://, mssql:// without the database's driver
        raise RegistryError(
            f"MLflow at {tracking_uri}: the database driver {err.name!r} is not installed: pip install it "
            "into this environment (psycopg for PostgreSQL, mysqlclient for MySQL, pyodbc for SQL Server)"
        ) from None
    except (MlflowException, SQLAlchemyError, OSError) as err:
        reason = mlflow_message(err) if isinstance(err, MlflowException) else str(err).splitlines()[0]
        raise RegistryError(
            f"MLflow at {tracking_uri} cannot be opened: {reason[:300]}; check tracking.tracking_uri "
            "(HERO_TRACKING__TRACKING_URI)"
        ) from None


@dataclass(frozen=True)
class AliasHolder:
    version: str  # the version the alias names
    record: dict[str, str] | None  # hero's record of the move to it (version, previous, moved_at, by);
    # None when the alias moved outside hero (MLflow's UI or API) since hero's last move


class Registry:
    """Registered model `name` on an MLflow tracking server (or SQLite store) and its champion alias."""

    def __init__(self, tracking_uri: str, name: str, alias: str):
        if (problem := unreachable(tracking_uri)) is not None:
            raise RegistryError(problem)
        if tracking_uri.startswith("sqlite:///"):
            database = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
            if not database.is_file():  # MLflow would create an empty store: a typo would read "no versions"
                raise RegistryError(
                    f"no MLflow database at {database} (tracking.tracking_uri {tracking_uri}): a `hero "
                    "run` creates it; or set HERO_TRACKING__TRACKING_URI to the one your runs track to"
                )
        self.tracking_uri = tracking_uri
        self.client = open_client(tracking_uri)
        self.name = name
        self.alias = alias

    def register(self, mlflow_run_id: str, tags: dict[str, str]) -> ModelVersion:
        """A new version from the run's logged LoRA model (the registered model is created if new)."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # refused, or the server failing: say that
                raise
            self.client.create_registered_model(
                self.name, description="HERO LoRAs (diffusers flavour); the champion alias serves production."
            )
        for existing in self.client.search_model_versions(
            f"name = '{self.name}' and run_id = '{mlflow_run_id}'"
        ):
            if existing.tags.get(ROUND_TAG) == tags.get(ROUND_TAG):
                return existing  # a resumed run registering what it registered before
        source = f"{self.client.get_run(mlflow_run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        return self.client.create_model_version(self.name, source, run_id=mlflow_run_id, tags=tags)

    def resolve(self, uri: str) -> ModelVersion:
        """The version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names."""
        match = MODEL_URI.fullmatch(uri)
        if match is None:
            raise RegistryError(model_uri_problem(uri))
        try:
            if match["alias"]:
                return self.client.get_model_version_by_alias(match["name"], match["alias"])
            return self.client.get_model_version(match["name"], match["version"])
        except MlflowException as err:
            if not _names_nothing(err, alias=bool(match["alias"])):
                raise RegistryError(f"{uri}: {mlflow_message(err)}") from None
        missing = f"no alias @{match['alias']}" if match["alias"] else f"no version {match['version']}"
        raise RegistryError(f"{uri}: {self.what_is_there(match['name'], missing)}")

    def what_is_there(self, name: str, missing: str) -> str:
        """An error's text about something registered model `name` lacks (`missing`: "no version 9"):
        the versions and aliases it has, or the registered models there are when it is none."""
        try:
            model = self.client.get_registered_model(name)
            numbers = sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{name}'"))
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"registered model {name!r}: {mlflow_message(err)}") from None
            names = sorted(m.name for m in self.client.search_registered_models(max_results=_LISTED))
            there = f"there are {', '.join(names)}" if names else "a finished `hero run` registers its LoRA"
            return f"no registered model {name!r} ({there}; tracking.registered_model names it)"
        if not numbers:
            return f"{name} has no versions yet (a finished `hero run` registers one)"
        shown = ", ".join(map(str, numbers[-_LISTED:]))
        aliases = ", ".join(f"@{alias} -> {v}" for alias, v in sorted(model.aliases.items()))
        return (
            f"{name} has {missing}; its versions: {'..., ' if len(numbers) > _LISTED else ''}{shown} "
            f"(`hero registry ls` describes them); its aliases: {aliases or 'none yet'} (`hero promote` "
            f"moves @{self.alias} to a version that wins, `hero registry alias VERSION` by hand)"
        )

    def version(self, version: str | None = None) -> ModelVersion:
        """Version `version` of the registered model, or its latest when None."""
        if version is not None:
            version = str(version)  # MLflow's SQL store hands out its versions as ints
            if not (version.isascii() and version.isdigit()):  # else it would read as a malformed URI
                raise RegistryError(
                    f"version {version!r} of {self.name}: a registry version is its number, e.g. 3"
                )
            return self.resolve(f"models:/{self.name}/{version}")
        versions = self._versions()
        if not versions:
            raise RegistryError(self.what_is_there(self.name, "no latest version"))
        return max(versions, key=lambda v: int(v.version))

    def versions(self) -> list[ModelVersion]:
        """Every version of the registered model, the newest first."""
        return sorted(self._versions(), key=lambda v: int(v.version), reverse=True)

    def aliases(self) -> dict[str, AliasHolder]:
        """The registered model's aliases: the version each names and hero's record of the move to it
        (none: no registered model)."""
        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as err:
            if _names_nothing(err, alias=False):
                return {}
            raise RegistryError(f"registered model {self.name!r}: {mlflow_message(err)}") from None
        found = {}
        for alias, number in model.aliases.items():
            prefix = f"hero.alias.{alias}."
            record = {k.removeprefix(prefix): v for k, v in model.tags.items() if k.startswith(prefix)}
            # a record naming another version: the alias moved since, elsewhere (MLflow's UI or API)
            found[alias] = AliasHolder(str(number), record if record.get("version") == str(number) else None)
        return found

    def version_of_run(self, mlflow_run_id: str) -> ModelVersion | None:
        """The newest version registered from MLflow run `mlflow_run_id` (a HERO run's, tracking.json),
        None if it registered none. Never by the HERO run's name: an earlier run of that name has its
        own MLflow run and versions."""
        mine = [v for v in self._versions() if v.run_id == mlflow_run_id]
        return max(mine, key=lambda v: int(v.version)) if mine else None

    def _versions(self) -> list[ModelVersion]:
        try:
            return list(self.client.search_model_versions(f"name = '{self.name}'"))
        except MlflowException as err:
            raise RegistryError(f"registered model {self.name!r}: {mlflow_message(err)}") from None

    def champion(self) -> ModelVersion | None:
        """The version holding the champion alias; None when there is no registered model yet or the
        alias was never set. Any other failure is raised: read as "no champion", a challenger would be
        judged against the base model and could replace a better champion."""
        return self.holder(self.alias)

    def holder(self, alias: str) -> ModelVersion | None:
        """The version holding `alias` (None: nobody, or no registered model yet)."""
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as err:
            if _names_nothing(err, alias=True):
                return None
            what = f"the champion (@{alias})" if alias == self.alias else f"@{alias}"
            raise RegistryError(f"{what} of {self.name} cannot be read: {mlflow_message(err)}") from None

    def point_alias(self, version: ModelVersion, alias: str) -> ModelVersion | None:
        """Point `alias` at `version` by hand (a person's decision, a rollback), the move recorded on
        the registered model (`aliases`); the version that held it before (None: nobody).
        Nothing moves when `version` holds it already (returned)."""
        previous = self.holder(alias)
        if previous is not None and previous.version == version.version:
            return previous
        # the alias first: a record of a move must never stand beside an alias that did not move
        try:
            self.client.set_registered_model_alias(self.name, alias, version.version)
        except MlflowException as err:
            raise RegistryError(
                f"@{alias} of {self.name} could not be moved to version {version.version}: "
                f"{mlflow_message(err)}; try again"
            ) from None
        try:
            self._record_move(alias, version, previous, by="hand")
        except MlflowException as err:
            raise RegistryError(
                f"@{alias} of {self.name} moved to version {version.version}, but the record of the move "
                f"(the registered model's hero.alias.{alias}.* tags) was not written: {mlflow_message(err)}"
            ) from None
        return previous

    def _record_move(
        self, alias: str, version: ModelVersion, previous: ModelVersion | None, *, by: str
    ) -> None:
        record = {
            "version": str(version.version),
            "previous": "none" if previous is None else str(previous.version),
            "moved_at": _now(),
            "by": by,
        }
        for what, value in record.items():
            self.client.set_registered_model_tag(self.name, f"hero.alias.{alias}.{what}", value)

    def load(
        self, version: ModelVersion, *, device: str = "cpu", allow_download: bool = False, lora: bool = True
    ) -> StableDiffusionPipeline:
        """The base pipeline the version records (its source, in the dtype and from the seed it was
        trained with) with its LoRA loaded; lora=False: the base alone, as the version's incumbent
        when there is no champion yet. allow_download: a hub id base model not in the local cache may
        be downloaded (model.allow_download)."""
        with tempfile.TemporaryDirectory() as scratch:
            try:
                local = Path(
                    download_artifacts(
                        artifact_uri=version.source, dst_path=scratch, tracking_uri=self.tracking_uri
                    )
                )
                model = Model.load(str(local))
            except (MlflowException, OSError, ValueError, yaml.YAMLError) as err:  # gone or damaged
                message = (
                    _download_failure(mlflow_message(err)) if isinstance(err, MlflowException) else str(err)
                )
                raise RegistryError(
                    f"version {version.version} of {version.name}: its LoRA artifact ({version.source}) "
                    f"cannot be read: {message}; restore it, or register it again from its run"
                ) from None
            metadata = model.metadata or {}
            source = metadata.get(BASE_MODEL_KEY)
            dtype, seed = metadata.get(BASE_DTYPE_KEY), metadata.get(BASE_SEED_KEY)
            if dtype is None or seed is None:  # logged before the metadata kept them: its run's params
                dtype, seed = self._trained_dtype_and_seed(version)
            if not isinstance(source, str) or dtype not in DTYPES or type(seed) is not int:
                raise RegistryError(
                    f"version {version.version} of {version.name} records no readable base model "
                    f"({BASE_MODEL_KEY} {source!r}, {BASE_DTYPE_KEY} {dtype!r}, {BASE_SEED_KEY} {seed!r} "
                    "in its MLmodel metadata): register it again from its run"
                )
            pipe = load_pipeline(
                source,
                dtype=DTYPES[dtype],
                device=device,
                allow_download=allow_download,
                seed=seed,
                given_by=f"the base model of version {version.version} of {version.name}",
            )
            trained_on = metadata.get(BASE_WEIGHTS_KEY)
            if trained_on is not None and (now := weights_sha256(pipe)) != trained_on:
                changed = ", ".join(name for name, digest in now.items() if trained_on.get(name) != digest)
                raise RegistryError(
                    f"version {version.version} of {version.name} was trained on other weights than its "
                    f"base model {source!r} loads now ({changed} changed): its LoRA would apply to another "
                    "model; restore that base model (`hero toy pretrain` rewrites the toy model; a hub id "
                    "may have moved to a new revision)"
                )
            if not lora:
                return pipe
            weights = model.flavors["diffusers"]["adapter_weights"]
            try:
                if not (local / weights / LORA_WEIGHTS_FILE).is_file():
                    raise ValueError(f"it has no {weights}/{LORA_WEIGHTS_FILE}")
                load_lora(pipe, local / weights)
            except (OSError, ValueError) as err:  # said of the artifact, not of the download's temporary copy
                raise RegistryError(
                    f"version {version.version} of {version.name}: its LoRA artifact ({version.source}): "
                    f"{str(err).replace(str(local), '.')}; restore it, or register it again from its run"
                ) from None
        return pipe

    def _trained_dtype_and_seed(self, version: ModelVersion) -> tuple[str, int | str]:
        """model.dtype and model.seed as the version's run logged them as params (float32 and 0
        without them); a seed that is no number is returned as it is, for the caller to refuse."""
        try:
            params = self.client.get_run(version.run_id).data.params if version.run_id else {}
        except MlflowException:
            params = {}
        seed = params.get("model.seed", "0")
        return params.get("model.dtype", "float32"), int(seed) if seed.isdecimal() else seed

    def noise_pool(self, version: ModelVersion) -> NoisePool:
        """The noise pool the version's run left beside its LoRA (HERO runs only)."""
        with tempfile.TemporaryDirectory() as scratch:
            try:
                local = download_artifacts(
                    run_id=version.run_id,
                    artifact_path=NOISE_POOL_ARTIFACT,
                    dst_path=scratch,
                    tracking_uri=self.tracking_uri,
                )
            except (MlflowException, OSError):
                why = (
                    f"its run's {NOISE_POOL_ARTIFACT} artifact is gone (deleted from run {version.run_id}?)"
                    if version.tags.get(METHOD_TAG) == "hero"
                    else "only runs of method hero leave one (those since noise pools were logged)"
                )
                raise RegistryError(
                    f"version {version.version} of {version.name} has no noise pool: {why}; generate from "
                    "plain noise (drop --guided)"
                ) from None
            try:
                return NoisePool.load(Path(local))
            except ValueError as err:
                raise RegistryError(f"version {version.version} of {version.name}: {err}") from None

    def promote(
        self,
        challenger: ModelVersion,
        *,
        margin: float,
        images: int,
        evaluate: Callable[[ModelVersion | None], float],
        comparable: Callable[[ModelVersion | None], None] = lambda incumbent: None,
    ) -> PromotionDecision:
        """Evaluate the challenger and the incumbent (the champion, else the base model: `evaluate`
        gets None), move the alias when the challenger gains at least `margin` (and more than 0),
        record the decision and its figures as tags of the challenger version. `comparable` raises
        when the challenger may not be judged against an incumbent (every champion it meets)."""
        current = self.champion()
        self._refuse_the_champion(challenger, current)
        comparable(current)
        challenger_rate = evaluate(challenger)
        # MLflow has no compare-and-set of an alias: a promotion that moved it while this one evaluated
        # (runs finishing together each have one) makes its champion the incumbent to judge against
        for _ in range(_MOVES_FOLLOWED):
            incumbent_rate = evaluate(current)
            now = self.champion()
            if (now and now.version) == (current and current.version):
                break
            current = now
            self._refuse_the_champion(challenger, current)
            comparable(current)
        else:
            raise RegistryError(
                f"@{self.alias} of {self.name} moved {_MOVES_FOLLOWED} times while version "
                f"{challenger.version} was judged against it: promote it again when the others are done"
            )
        gain = round(challenger_rate - incumbent_rate, 9)  # rates are k/n: no float dust decides
        decision = PromotionDecision(
            promoted=gain > 0 and gain >= margin,
            challenger=challenger.version,
            incumbent="base" if current is None else current.version,
            challenger_rate=challenger_rate,
            incumbent_rate=incumbent_rate,
            margin=margin,
            images=images,
        )
        # the alias first: tags saying "promoted" must never stand beside an alias that did not move
        judged = (
            f"version {challenger.version} of {self.name} {'won' if decision.promoted else 'did not win'} "
            f"({challenger_rate:.3f} vs {decision.incumbent}: {incumbent_rate:.3f})"
        )
        if decision.promoted:
            try:
                self.client.set_registered_model_alias(self.name, self.alias, challenger.version)
            except MlflowException as err:
                raise RegistryError(
                    f"{judged}, but @{self.alias} could not be moved to it: {mlflow_message(err)}; promote "
                    "it again"
                ) from None
        try:
            if decision.promoted:
                self._record_move(self.alias, challenger, current, by="promotion")
            for key, value in decision.tags().items():
                self.client.set_model_version_tag(self.name, challenger.version, key, value)
        except MlflowException as err:
            # promoted, it holds the alias now (a second promotion is refused): the figures are here
            moved = f" and holds @{self.alias} now" if decision.promoted else ""
            again = "" if decision.promoted else "; promote it again to record them"
            raise RegistryError(
                f"{judged}{moved}, but the decision's tags were not written: {mlflow_message(err)}{again}"
            ) from None
        return decision

    def _refuse_the_champion(self, challenger: ModelVersion, current: ModelVersion | None) -> None:
        if current is not None and current.version == challenger.version:
            raise RegistryError(f"version {challenger.version} of {self.name} already holds @{self.alias}")


_MOVES_FOLLOWED = 3  # champions a promotion judges against before it gives up on a busy registry
_LISTED = 20  # versions (the latest) or registered models an error lists


def _download_failure(message: str) -> str:
    """MLflow's report of a failed download ("The following failures occurred ...", a "##### File X
    #####" header and the reason for each file) as its reasons on one line."""
    if not message.startswith("The following failures occurred"):
        return message
    reasons = [line for line in message.splitlines()[1:] if line.strip() and not line.startswith("#####")]
    return "; ".join(dict.fromkeys(reasons)) or message


def _names_nothing(err: MlflowException, *, alias: bool) -> bool:
    """Whether MLflow answered that the registered model (RESOURCE_DOES_NOT_EXIST) or, for an alias
    lookup, the alias (INVALID_PARAMETER_VALUE "... not found") does not exist."""
    return err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        alias and err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in err.message
    )


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    challenger: str  # version
    incumbent: str  # the champion's version, or "base" (the base model without a LoRA)
    challenger_rate: float
    incumbent_rate: float
    margin: float
    images: int

    @property
    def gain(self) -> float:
        return self.challenger_rate - self.incumbent_rate

    def tags(self) -> dict[str, str]:
        return {
            "hero.promotion.decision": "promoted" if self.promoted else "rejected",
            "hero.promotion.against": self.incumbent,
            "hero.promotion.challenger_rate": f"{self.challenger_rate:.4f}",
            "hero.promotion.incumbent_rate": f"{self.incumbent_rate:.4f}",
            "hero.promotion.margin": f"{self.margin:.4f}",
            "hero.promotion.images": str(self.images),
            "hero.promotion.at": _now(),
        }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
