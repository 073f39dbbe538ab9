"""The one configuration tree of a HERO run.

Loaded from a YAML file, then overridden by environment variables `HERO_<SECTION>__<FIELD>`
(e.g. `HERO_SAMPLING__ETA=0.5`). Defaults follow the HERO paper and its reference code
(shared HERO-REFERENCE.md); every field says what it does and what it interacts with.
Validation happens at load: a bad value fails with its dotted path and the reason.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import reprlib
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from hero_ml.adapters.storage.keys import check_prefix
from hero_ml.diffusion.architectures import ARCHITECTURES
from hero_ml.errors import HeroError
from hero_ml.redact import redact, secret_query_keys, url_userinfo

ENV_PREFIX = "HERO_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = "HERO_CONFIG_FILE"  # a base config file for services and workers
# HERO_* variables that are not settings: the infra scripts' and compose file's, the fault injector's
# (test_infra keeps the list whole); a name of neither kind close to a setting's is refused as a typo
OTHER_ENV_VARIABLES = frozenset(
    {
        CONFIG_FILE_ENV,
        "HERO_CRASH_AT",
        "HERO_GPU_POOL",
        "HERO_INFRA_STATE",
        "HERO_LABEL_STUDIO_ALLOW_LOOPBACK",
        "HERO_LABEL_STUDIO_PORT",
        "HERO_LABEL_STUDIO_VENV",
        "HERO_MLFLOW_BUCKET",
        "HERO_MLFLOW_PORT",
        "HERO_PREFECT_PORT",
        "HERO_S3_PORT",
        "HERO_SERVICE_POOL",
        "HERO_SERVICE_WORKER_PORT",
        "HERO_WEBHOOK_PORT",
        "HERO_WEBHOOK_SECRET",
        "HERO_WORKER_PORT",
    }
)


# MLflow's tracking stores (its file store, a plain folder or file://, refuses to open since MLflow 3.x)
TRACKING_SCHEMES = {"sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}
DATABASE_SCHEMES = {"postgresql", "mysql", "mssql"}  # a user name in their URIs is not a secret
SEED_MAX = 2**63 - 1  # torch's generators take seeds below 2**63
MAX_GENERATED = 1024  # images `hero generate` draws at most (one batch, held in memory)
# A registered version, as `hero generate` and the registry take it (fullmatch)
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[0-9]+))")
SECRET_MASK = "**********"  # how pydantic dumps a SecretStr to JSON
WEBHOOK_SECRET_MIN = 16  # characters
SECRET_IN_VALUE = "secret_in_value"  # an error type whose input holds a secret: never echoed
# Where the services are, how this process reaches them and where it runs the model: a resumed run
# takes these from the config of the process resuming it (a moved server, a rotated key, another
# worker's GPU). Every other setting says what the run learns and how its rounds close: a resume keeps
# the stored value, and a config that differs there is refused. Every secret is one of these.
SERVICE_SETTINGS = frozenset(
    {
        "storage",
        "tracking",
        "promotion",
        "label_studio.url",
        "label_studio.api_key",
        "orchestration.work_pool",
        "orchestration.webhook_secret",
        "orchestration.webhook_url",
        "orchestration.poll_interval_s",
        "model.device",
        "model.processes",
        "model.allow_download",
        "model.compile",
        "model.channels_last",
    }
)


def is_service_setting(section: str, name: str | None = None) -> bool:
    """Whether a section (name None) or a section's field is a service setting."""
    return section in SERVICE_SETTINGS or (name is not None and f"{section}.{name}" in SERVICE_SETTINGS)


def split_settings(public: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A public config dict as (what the run learns and how its rounds close, which a resume keeps;
    its service settings, which the process resuming it may change)."""
    learning: dict[str, Any] = {}
    service: dict[str, Any] = {}
    for section, value in public.items():
        if is_service_setting(section):
            service[section] = value
        elif isinstance(value, dict):
            learning[section] = {n: v for n, v in value.items() if not is_service_setting(section, n)}
            if moved := {n: v for n, v in value.items() if is_service_setting(section, n)}:
                service[section] = moved
        else:
            learning[section] = value
    return learning, service


class ConfigError(HeroError, ValueError):
    """A configuration that cannot be used; the message names every bad field and why."""


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of ignoring them. No setting
    # takes an infinity or a NaN (YAML's .inf, an environment's "inf").
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _secrets_apart(cls, value: Any) -> Any:
        # An empty secret would switch its check off (an empty webhook secret matches an empty
        # header); a URL is published (MLflow params, the stored config), so it holds no credentials.
        if isinstance(value, SecretStr) and not value.get_secret_value():
            raise PydanticCustomError(SECRET_IN_VALUE, "is empty: give it a value, or unset it")
        if isinstance(value, SecretStr) and value.get_secret_value() == SECRET_MASK:
            # a stored or logged config (config.json, MLflow's config/config.json) rerun as it is: the
            # mask is public, and as a webhook secret it would let anyone in
            raise PydanticCustomError(
                SECRET_IN_VALUE,
                "is the mask a stored config shows in place of a secret, not a secret: give the real one "
                "through its environment variable (HERO_<SECTION>__<FIELD>)",
            )
        url = str(value) if isinstance(value, HttpUrl) else None
        if url is not None and (url_userinfo(url) is not None or secret_query_keys(url)):
            raise PydanticCustomError(
                SECRET_IN_VALUE,
                "holds credentials (user:password@, or a secret query parameter such as password or "
                "token): remove them from the URL; secrets are given through their own settings "
                "(HERO_<SECTION>__<FIELD>, e.g. HERO_LABEL_STUDIO__API_KEY)",
            )
        return value


class ModelConfig(_Section):
    source: str = Field(
        "toy",
        min_length=1,
        description=(
            "The Stable Diffusion pipeline to fine-tune: a local diffusers folder, a hub id "
            "(e.g. 'runwayml/stable-diffusion-v1-5'), 'toy' for the committed toy model (shapes; "
            "the embedded default), or 'random:<arch>' for SD-shaped random weights ('random:tiny' "
            "for tests, 'random:sd15' for compute benchmarks)."
        ),
    )
    allow_download: bool = Field(
        False,
        description=(
            "Let a hub id be downloaded when it is not in the local Hugging Face cache. Off by "
            "default so that nothing is ever fetched silently; download once, then run offline."
        ),
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description=(
            "Weights dtype of the VAE, text encoder and UNet. The reference uses float16 on GPU; "
            "LoRA parameters are always trained in float32, and float16 trains with a dynamic loss "
            "scale (its gradients would underflow otherwise). bfloat16 runs at float16's speed but "
            "rounds 8x coarser: on an H200, 12% of DDPO's first-look ratios leave a clip_range of "
            "1e-4 by rounding alone (float16: 0%), so use it only with a wider ddpo.clip_range."
        ),
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|mps|cuda(:\d{1,3})?)$",
        description="Torch device of the pipeline: 'cpu', 'cuda', 'cuda:1', 'mps'.",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Processes a training run samples and learns on, data parallel: each samples "
            "images_per_round / processes of every round (which it must divide) and trains its share "
            "of every DDPO step. With device 'cuda' process k uses GPU k; on the CPU they share its "
            "cores (tests). The run starts the others itself; results equal one process's up to float "
            "rounding, so a run may resume on another number of processes. Evaluations run on one."
        ),
    )
    channels_last: bool = Field(
        False,
        description=(
            "Keep the UNet and VAE weights channels-last: convolutions then run on GPU tensor cores "
            "without layout transposes (see docs/PERFORMANCE.md for what it gains). Results change "
            "only by rounding."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile the UNet. The first round pays the compile time (minutes for SD 1.5) and "
            "each new batch shape or adapter state (d3po's reference policy) compiles once more; "
            "worth it for long runs on a GPU, not on the CPU."
        ),
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank on the UNet attention projections.")
    lora_alpha: float = Field(
        4.0,
        gt=0,
        description="LoRA alpha; the update is scaled by alpha / rank (equal values: scale 1).",
    )
    lora_init: Literal["kaiming", "gaussian"] = Field(
        "kaiming",
        description=(
            "How the LoRA's A matrices start (B starts at 0 either way, so the adapter starts as the "
            "identity). 'kaiming': peft's default, std 1/sqrt(3 * fan_in); 'gaussian': N(0, 1/rank^2), "
            "the reference code's (diffusers 0.25 LoRAAttnProcessor). Adam moves B by about ddpo.lr a "
            "step whatever A is, so A's scale multiplies the weights' change: at rank 4 'gaussian' "
            "moves SD 1.5's 8-15x and the toy's 2.5-5x further a step. The toy's ddpo.lr and d3po.lr "
            "were tuned with 'kaiming'; configs/sd15-paper.yaml uses 'gaussian' with the paper's lr."
        ),
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of random weights of source 'random:<arch>'.")

    @field_validator("source")
    @classmethod
    def _known_random_arch(cls, source: str) -> str:
        if source.startswith("random:") and (arch := source.removeprefix("random:")) not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
        return source


class SamplingConfig(_Section):
    prompt: str = Field(
        "three purple squares",
        min_length=1,
        description="The prompt every image of a round is sampled from.",
    )
    negative_prompt: str = Field(
        "", description="Negative prompt for classifier-free guidance (the reference: empty)."
    )
    images_per_round: int = Field(
        64,
        ge=2,
        description=(
            "Images sampled and labelled each round; one labelled image is one feedback, so "
            "rounds = feedback budget / images_per_round."
        ),
    )
    num_steps: int = Field(
        20,
        ge=1,
        description=(
            "DDIM denoising steps (the trajectory's length). 20 for the toy model: its base rates "
            "match those at 50 within sampling noise, at 2.5x less compute. The paper: 50 on SD 1.5."
        ),
    )
    eta: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "DDIM stochasticity. Must be > 0: with eta = 0 the steps are deterministic and have "
            "no log-probability, so DDPO cannot learn."
        ),
    )
    guidance_scale: float = Field(
        5.0, ge=1, description="Classifier-free guidance scale, in sampling and in training."
    )
    sub_batch_size: int = Field(
        32,
        ge=1,
        description=(
            "Images denoised at once. Bounds peak memory; results do not depend on it, since "
            "every image has its own random stream. The reference: 8 (SD 1.5 on a 2022 GPU)."
        ),
    )
    storage_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description=(
            "Dtype trajectories are kept in (CPU memory, storage). Sampling continues from the "
            "stored value, so recorded log-probs stay exact at any precision."
        ),
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="Seed of the initial noises and per-step noises.")

    def denoising_steps_per_round(self, processes: int = 1) -> int:
        """UNet calls of a round's sampling in each of `processes` (model.processes): every step of
        every sub-batch of its share (what a progress bar counts)."""
        return -(-(self.images_per_round // processes) // self.sub_batch_size) * self.num_steps


class EncoderConfig(_Section):
    lr: float = Field(
        1e-3,
        gt=0,
        description=(
            "Adam learning rate of the feedback encoder (toy-tuned; the paper: 1e-5, for SD 1.5's "
            "2048-wide features). At 1e-5 the toy's 128-wide encoder barely moves its pre-head "
            "features, the reward stops ranking good over bad, and binding collapsed (0.156 -> 0.020 "
            "at 256 feedbacks); 1e-3 gave 0.246 there and kept counting (0.496)."
        ),
    )
    epochs_per_round: int = Field(
        500, ge=1, description="Triplet-loss epochs each round (one batch of triplets each)."
    )
    triplets_per_epoch: int = Field(64, ge=1, description="Triplets in the batch of one epoch.")
    margin: float = Field(0.5, gt=0, description="Triplet margin on the distance 1 - (cos + 1)/2.")
    reward: Literal["best", "mean_good", "best_plus_label"] = Field(
        "best",
        description=(
            "Reward: similarity to the best image ('best', the paper), mean similarity to all good "
            "images ('mean_good'), or similarity to the best plus 1 for a good image "
            "('best_plus_label': every good image above every bad one, the encoder ranking within "
            "each label; the paper's reward can rank a bad image above a good one). hero, 3 seeds at "
            "512 feedbacks, with it and with 'best': anomaly 0.418 and 0.318, binding 0.290 and "
            "0.135, counting 0.392 and 0.316, personal 0.469 and 0.430, safety 0.514 and 0.350 "
            "(toy tasks; benchmarks/FINDINGS.md)."
        ),
    )
    replay: bool = Field(
        False,
        description=(
            "Also draw triplets from earlier rounds' labels (each with its own best), not only "
            "this round's. Off in the paper; on keeps every round's latents in the run state."
        ),
    )


class DDPOConfig(_Section):
    lr: float = Field(
        3e-3,
        gt=0,
        description="AdamW learning rate of the LoRA parameters (toy-tuned; the paper: 1e-3).",
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip of each optimiser step.")
    clip_range: float = Field(
        1.6e-3,
        gt=0,
        description=(
            "PPO clip of the new/old probability ratio. Log-probs are means over the latent's "
            "elements, so the clip bounds the summed log-prob by clip x elements: the paper's 1e-4 "
            "over SD 1.5's 16384 elements is 1.6; 1.6e-3 over the toy's 1024 is the same bound "
            "(toy default). At 1e-2 the toy's curves swung and collapsed between rounds; at 1e-4 "
            "half the samples were clipped out of every pass after the first "
            "(benchmarks/FINDINGS.md). It drops samples from the gradient; the step's size is lr's."
        ),
    )
    adv_clip_max: float = Field(5.0, gt=0, description="Normalised advantages are clipped to ±this.")
    timesteps_per_trajectory: int = Field(
        5,
        ge=1,
        description=(
            "Random denoising steps trained per trajectory and pass (must be <= sampling.num_steps; "
            "drawn afresh each of ddpo.inner_epochs). The paper trains 5 of 50 steps once (10%); the "
            "toy's 5 of 20 over 4 passes reach about 68% of each trajectory's steps a round."
        ),
    )
    train_batch_size: int = Field(
        8,
        ge=1,
        description=(
            "Trajectories per forward/backward pass; x gradient_accumulation_steps = trajectories "
            "per optimiser step (8 here and in the paper, which fits 2 x 4 on a GPU)."
        ),
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Passes accumulated into one optimiser step."
    )
    inner_epochs: int = Field(
        4,
        ge=1,
        description=(
            "Passes over the round's samples each update (toy-tuned; the paper: 1). Each pass "
            "costs a round's worth of UNet forward and backward passes on the trained timesteps."
        ),
    )
    kl_to_base: float = Field(
        0.0,
        ge=0,
        description=(
            "Weight of a penalty on each trained step's KL (per latent element, like the log-probs) "
            "from the base model's step (the UNet with its adapters off). It holds what the labels "
            "never told apart (all images had it) where the reward would trade it away; it costs one "
            "more forward pass per trained step. 0 (default, as in the paper): off."
        ),
    )
    target_kl: float | None = Field(
        None,
        gt=0,
        description=(
            "Stop a round's update before an optimiser step whose samples' mean approx-KL to the "
            "sampling policy exceeds this (PPO's early stop); the rest of the round's passes are "
            "skipped. Bounds how far one round moves the policy whatever lr and inner_epochs ask. "
            "DDPO methods only. None (default, as in the paper): every step is taken."
        ),
    )


class D3POConfig(_Section):
    # D3PO trains on the ddpo section's timesteps, batches, passes and grad clip (the same compute a
    # round as DDPO); only its loss and learning rate are its own.
    beta: float = Field(0.1, gt=0, description="Temperature of the preference log-sigmoid.")
    clip_eps: float = Field(
        0.1, gt=0, lt=1, description="Policy/reference ratios are clipped to [1 - clip_eps, 1 + clip_eps]."
    )
    lr: float = Field(
        3e-4,
        gt=0,
        description=(
            "AdamW learning rate of the LoRA parameters under D3PO (toy-tuned: 3e-5, the paper's, did "
            "not move the toy model, 1e-3 diverged; see benchmarks/FINDINGS.md)."
        ),
    )


class GuidanceConfig(_Section):
    # Used by method 'hero' only; 'hero-noguide' is the ablation with plain N(0, I) every round.
    best_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description=(
            "Fraction of a round started near the best image's noise (rounded up); the rest near "
            "the other good images' (near the best too when there are none). At 0 the best is drawn "
            "like one of the good."
        ),
    )
    noise_eps: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Perturbation: x = sqrt(1 - eps^2) * x_best_or_good + eps * n, n ~ N(0, I).",
    )


class FeedbackConfig(_Section):
    budget: int = Field(
        512,
        ge=1,
        description=(
            "Total feedbacks (labelled images) to spend, in whole rounds (a multiple of "
            "images_per_round x annotators_per_image); the run stops when it is spent."
        ),
    )
    annotators_per_image: int = Field(
        1, ge=1, description="Labels required on every image before a round counts as complete."
    )


class SimulationConfig(_Section):
    # The embedded default's annotators: used when label_studio.enabled is false.
    task: str | None = Field(
        "counting",
        min_length=1,
        description=(
            "Toy task the simulated annotators and the evaluations judge by (a shipped name, as in "
            "`hero toy tasks`, or a task file path); sampling.prompt must be one of its prompts. null: "
            "no toy task, for a real model's prompt: people label in Label Studio (label_studio.enabled) "
            "and no run evaluation or automatic promotion is made (there is no judge)."
        ),
    )
    flip_probability: float = Field(
        0.0, ge=0, le=1, description="Chance that a simulated annotator flips an image's good/bad label."
    )
    eval_images: int = Field(
        64,
        ge=0,
        description=(
            "Images judged by the task before the first and after the last round, from fixed plain "
            "noises, to report the success rate; 0 (or no task) skips it."
        ),
    )


class StorageConfig(_Section):
    backend: Literal["local", "s3"] = Field(
        "local", description="Where images, trajectories and checkpoints live."
    )
    local_root: Path = Field(
        Path("hero-data"), description="Root folder of the local backend; runs/<run_id>/... below it."
    )

    @field_validator("local_root", mode="before")
    @classmethod
    def _a_folder_named(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # Path("") is the current folder
            raise ValueError("is empty: name the folder runs are kept in, e.g. hero-data")
        if "\x00" in str(value):  # no file system takes it: every open would fail later
            raise ValueError("holds a NUL character: name the folder runs are kept in, e.g. hero-data")
        return value

    s3_bucket: str | None = Field(
        None, description="Bucket of the s3 backend: its name alone (3-63 of a-z 0-9 . -), no s3:// or key."
    )

    @field_validator("s3_bucket")
    @classmethod
    def _a_bucket_name(cls, bucket: str | None) -> str | None:
        if bucket is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(
                "is not a bucket name: give the name alone (3-63 characters of a-z, 0-9, '.' and '-'), "
                "without s3:// or a key; a folder inside the bucket goes in s3_prefix"
            )
        return bucket

    s3_endpoint_url: HttpUrl | None = Field(
        None, description="S3 endpoint for MinIO or other S3-compatible servers; empty for AWS."
    )
    s3_region: str = Field(
        "us-east-1",
        description="S3 region, e.g. us-east-1 (lower case letters, digits and '-').",
    )

    @field_validator("s3_region")
    @classmethod
    def _a_region_name(cls, region: str) -> str:
        # botocore would refuse it only when the store opens, with its own traceback
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", region):
            raise ValueError("a region is lower case letters, digits and '-', e.g. us-east-1 or eu-west-2")
        return region

    s3_access_key_id: SecretStr | None = Field(
        None, description="S3 access key id; empty to use the standard AWS credential chain."
    )
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")
    s3_prefix: str = Field(
        "", description="Key prefix inside the bucket (e.g. 'hero/' to share a bucket); '' for the root."
    )
    s3_addressing_style: Literal["path", "virtual"] | None = Field(
        None,
        description=(
            "Bucket addressing: 'path' (MinIO and most S3-compatible servers) or 'virtual' (AWS); "
            "empty picks 'path' when s3_endpoint_url is set, else 'virtual'."
        ),
    )
    s3_max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per S3 request (botocore 'standard' retries, backoff)."
    )
    s3_timeout_s: float = Field(30.0, gt=0, description="Connect and read timeout of one S3 request.")
    presigned_url_ttl_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned image URLs for annotators."
    )

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> StorageConfig:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("backend 's3' needs s3_bucket (HERO_STORAGE__S3_BUCKET)")
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "s3_access_key_id and s3_secret_access_key go together: set both, or neither to use "
                "the standard AWS credential chain"
            )
        return self

    @field_validator("s3_prefix")
    @classmethod
    def _prefix_as_stored(cls, prefix: str) -> str:
        # one spelling everywhere: the store and Label Studio's image links both put keys after it
        return check_prefix(prefix)


class TrackingConfig(_Section):
    tracking_uri: str = Field(
        "sqlite:///hero-data/mlflow.db",
        description=(
            "MLflow tracking URI: an MLflow server URL, or a SQLite file; unset, mlflow.db in "
            "storage.local_root (artifacts in mlartifacts/ beside it)."
        ),
    )
    experiment: str = Field("hero", min_length=1, description="MLflow experiment name.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_password_in_uri(cls, uri: str) -> str:
        # the URI is public (MLflow params, the stored config): a password in it would be published,
        # and so would a token given as the user of an http(s) URI
        scheme = urlsplit(uri).scheme.split("+")[0]  # postgresql+psycopg2: a driver after the '+'
        userinfo = url_userinfo(uri)
        if (
            userinfo is not None and (":" in userinfo or scheme not in DATABASE_SCHEMES)
        ) or secret_query_keys(uri):
            raise PydanticCustomError(
                SECRET_IN_VALUE,
                "holds credentials (a password, a token as the user, or a secret query parameter such "
                "as password or token): remove them from the URI and give them through the environment "
                "(MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / _PASSWORD for an MLflow server; "
                "PGPASSWORD or ~/.pgpass for PostgreSQL)",
            )
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"scheme {scheme!r} is not one MLflow keeps runs under: use sqlite:///path/mlflow.db, "
                "http(s)://server, postgresql://, mysql://, mssql:// or databricks (MLflow's file "
                "store, a folder, is retired)"
            )
        return uri

    # MLflow's rules, checked here: else a bad name fails only when a finished run registers its LoRA
    registered_model: str = Field(
        "hero-lora",
        min_length=1,
        description=(
            "Registry name LoRAs are registered under (no '/', ':' or '@': models:/<name>@<alias>; no "
            "quotes: MLflow's search filters quote it)."
        ),
    )
    champion_alias: str = Field(
        "champion",
        description=(
            "Registry alias of the LoRA in production: letters, digits, '_' and '-'; 'latest' and "
            "v<number> are MLflow's own."
        ),
    )

    @field_validator("registered_model")
    @classmethod
    def _an_mlflow_model_name(cls, name: str) -> str:
        if set(name) & set("/:@'\"`") or name != name.strip():
            raise ValueError(
                "MLflow takes no '/', ':', '@' or quotes in a model's name (its search filters quote "
                "it), nor spaces around it: e.g. 'hero-lora'"
            )
        return name

    @field_validator("champion_alias")
    @classmethod
    def _an_mlflow_alias(cls, alias: str) -> str:
        if (problem := alias_problem(alias)) is not None:
            raise ValueError(problem)
        return alias

    register_lora: bool = Field(
        True,
        description=(
            "Register the run's final LoRA as a new version of registered_model (MLflow's diffusers "
            "flavour: adapter weights + a reference to model.source, never a copy of the base model)."
        ),
    )


class PromotionConfig(_Section):
    """`hero promote`: a challenger version takes the champion alias only on a measured win."""

    eval_images: int = Field(
        256,
        ge=16,
        description=(
            "Images each model generates for the comparison, from the same fixed noises (plain "
            "N(0, I), seed eval_seed), judged by the version's toy task. More images, smaller noise."
        ),
    )
    eval_seed: int = Field(1000, ge=0, le=SEED_MAX, description="Seed of the fixed evaluation noises.")
    margin: float = Field(
        0.03,
        ge=0,
        le=1,
        description=(
            "Success-rate points the challenger must gain over the champion (over the base model "
            "when there is no champion yet) to be promoted. A rate on 256 images has a standard "
            "error of up to 0.03; shared noises make the difference less noisy than that, and the "
            "margin keeps luck from promoting."
        ),
    )


LABEL_STUDIO_TITLE_MAX = 50  # characters of a project title (Label Studio's own limit)


class LabelStudioConfig(_Section):
    enabled: bool = Field(
        False, description="Ask humans in Label Studio; off = the simulated annotator (embedded)."
    )
    url: HttpUrl = Field(HttpUrl("http://127.0.0.1:8080"), description="Label Studio base URL.")
    api_key: SecretStr | None = Field(
        None, description="Label Studio personal access token (HERO_LABEL_STUDIO__API_KEY)."
    )
    project_title_prefix: str = Field(
        "HERO", description="Projects are named '<prefix> <run_id>', one per run."
    )
    proxy_images: bool = Field(
        False,
        description=(
            "Label Studio streams the task images from S3 itself, instead of redirecting annotators' "
            "browsers to presigned URLs of storage.s3_endpoint_url: on when that endpoint is a name only "
            "the services resolve (the compose stack's http://minio:9000) or S3 must stay private; "
            "the images then cost Label Studio's bandwidth."
        ),
    )
    suggestions: bool = Field(
        False,
        description=(
            "Pre-annotate image tasks from the encoder's reward ranking (good above the round's "
            "median similarity to the current best), shown as suggestions to confirm or change. "
            "Off by default, as suggestions sway annotators; methods without an encoder have none."
        ),
    )

    @model_validator(mode="after")
    def _enabled_needs_key(self) -> LabelStudioConfig:
        if self.enabled and self.api_key is None:
            raise ValueError("enabled Label Studio needs api_key (HERO_LABEL_STUDIO__API_KEY)")
        return self


class OrchestrationConfig(_Section):
    """Prefect itself is found by PREFECT_API_URL: unset, flows run in Prefect's ephemeral mode."""

    work_pool: str = Field("hero-gpu", description="Prefect work pool of GPU work (`hero deploy`).")
    webhook_secret: SecretStr | None = Field(
        None,
        description=(
            "Shared secret Label Studio webhooks must carry (HERO_ORCHESTRATION__WEBHOOK_SECRET); "
            "`hero serve-webhooks` refuses to start without one."
        ),
    )

    @field_validator("webhook_secret")
    @classmethod
    def _a_header_value_hard_to_guess(cls, secret: SecretStr | None) -> SecretStr | None:
        # sent back by Label Studio as an HTTP header: surrounding spaces are stripped on the way and
        # other than printable ASCII does not travel, so such a secret would never match
        value = None if secret is None else secret.get_secret_value()
        if value is None or value == SECRET_MASK:
            return secret  # the mask: refused by _secrets_apart, with its own reason
        if (
            len(value) < WEBHOOK_SECRET_MIN
            or value != value.strip()
            or not value.isascii()
            or not value.isprintable()
        ):
            raise PydanticCustomError(
                SECRET_IN_VALUE,
                f"must be at least {WEBHOOK_SECRET_MIN} printable ASCII characters without surrounding "
                "spaces (it travels as an HTTP header, and a short one can be guessed): e.g. `openssl rand "
                "-hex 16`",
            )
        return secret

    webhook_url: HttpUrl | None = Field(
        None,
        description=(
            "Where Label Studio posts annotation events (`hero serve-webhooks`, reachable from Label "
            "Studio); the run registers it on its project with webhook_secret, which it needs. None: "
            "rounds resume by the poller alone."
        ),
    )
    round_deadline_h: float | None = Field(
        None,
        gt=0,
        description=(
            "Hours after publishing after which a round closes with fewer labels than wanted, once "
            "every image has deadline_min_labels (and round 0 a best vote). None: wait for all "
            "feedback.annotators_per_image labels of every image, however long it takes."
        ),
    )
    deadline_min_labels: int = Field(
        1,
        ge=1,
        description="Labels every image needs to close a round at its deadline (<= annotators_per_image).",
    )
    poll_interval_s: int = Field(
        300,
        ge=10,
        description=(
            "Seconds between the fallback checks of waiting rounds (`hero rounds poll`, the "
            "hero-poll-rounds deployment): they resume rounds whose webhook events were lost."
        ),
    )

    @model_validator(mode="after")
    def _webhook_needs_secret(self) -> OrchestrationConfig:
        # registered without the secret, every event would be refused by `hero serve-webhooks`, and
        # the run would replace the secret header of a webhook registered with one
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError(
                "webhook_url is set but webhook_secret is not: set HERO_ORCHESTRATION__WEBHOOK_SECRET "
                "in this process's environment (the receiver's secret), or unset webhook_url"
            )
        return self


class HeroConfig(BaseSettings):
    """The whole configuration of a HERO run."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_parse_none_str="null",  # HERO_SIMULATION__TASK=null unsets a setting, as `null` does in YAML
        extra="forbid",
        validate_default=True,
        # pydantic's own error text never repeats an input (it may be a secret, or hold one);
        # format_validation_error shows the inputs that are safe to show
        hide_input_in_errors=True,
    )

    run_id: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description=(
            "Names the run in storage keys, MLflow and Label Studio: 1 to 64 letters, digits, _ . -, "
            "starting with a letter or digit."
        ),
    )
    method: Literal["hero", "hero-noguide", "ddpo-binary", "d3po"] = Field(
        "hero",
        description=(
            "Learning method. 'hero': encoder rewards + DDPO + feedback-guided noise (the paper); "
            "'hero-noguide': the same from plain N(0, I) noise; 'ddpo-binary': DDPO on reward 1 for "
            "good, 0 for bad (no encoder); 'd3po': pairwise good-over-bad preferences (section d3po). "
            "All spend the same feedback budget."
        ),
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    ddpo: DDPOConfig = Field(default_factory=DDPOConfig)
    d3po: D3POConfig = Field(default_factory=D3POConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    label_studio: LabelStudioConfig = Field(default_factory=LabelStudioConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _tracking_beside_the_runs(self) -> HeroConfig:
        # MLflow's SQLite file goes where the runs go unless a tracking_uri is given: set apart, a run
        # moved to another local_root left its tracking in the current folder, where `hero promote`
        # from elsewhere found none
        if "tracking_uri" not in self.tracking.model_fields_set:
            if set(str(self.storage.local_root)) & set("?#"):
                raise ValueError(
                    "storage.local_root holds '?' or '#', which a SQLite URI reads as its query: set "
                    "tracking.tracking_uri (HERO_TRACKING__TRACKING_URI), or name another folder"
                )
            self.tracking = self.tracking.model_copy(
                update={"tracking_uri": _beside(self.storage.local_root)}
            )
        return self

    @model_validator(mode="after")
    def _cross_section_checks(self) -> HeroConfig:
        if self.method == "d3po" and self.ddpo.target_kl is not None:
            raise ValueError(
                "ddpo.target_kl bounds the KL to the sampling policy, which D3PO does not measure "
                "(its KL is to the base model): unset ddpo.target_kl or pick a DDPO method"
            )
        if self.method == "d3po" and self.ddpo.kl_to_base > 0:
            raise ValueError(
                "ddpo.kl_to_base is a DDPO penalty; D3PO holds the policy near the base model with "
                "its own d3po.beta: set ddpo.kl_to_base to 0 or pick a DDPO method"
            )
        if self.ddpo.timesteps_per_trajectory > self.sampling.num_steps:
            raise ValueError(
                f"ddpo.timesteps_per_trajectory ({self.ddpo.timesteps_per_trajectory}) exceeds "
                f"sampling.num_steps ({self.sampling.num_steps}): lower it or sample more steps"
            )
        if self.orchestration.deadline_min_labels > self.feedback.annotators_per_image:
            raise ValueError(
                f"orchestration.deadline_min_labels ({self.orchestration.deadline_min_labels}) exceeds "
                f"feedback.annotators_per_image ({self.feedback.annotators_per_image}): a deadline "
                "cannot ask for more labels than a complete round"
            )
        title = f"{self.label_studio.project_title_prefix} {self.run_id}"
        if self.label_studio.enabled and len(title) > LABEL_STUDIO_TITLE_MAX:
            raise ValueError(
                f"label_studio.project_title_prefix and run_id make the run's Label Studio project title "
                f"{title!r}, {len(title)} characters: Label Studio takes at most {LABEL_STUDIO_TITLE_MAX}; "
                "shorten either"
            )
        if (processes := self.model.processes) > 1:
            if self.sampling.images_per_round % processes:
                images = self.sampling.images_per_round
                divisors = [k for k in range(1, processes) if images % k == 0]
                raise ValueError(
                    f"sampling.images_per_round ({images}) is not a multiple of model.processes "
                    f"({processes}): each process samples an equal share of a round; set images_per_round "
                    f"to a multiple of {processes} (e.g. {-(-images // processes) * processes}), or "
                    f"processes to a divisor of {images} (e.g. {max(divisors)})"
                )
            if self.model.device not in ("cpu", "cuda"):
                raise ValueError(
                    f"model.device {self.model.device!r} with model.processes {processes}: process k "
                    "runs on GPU k, so set device 'cuda' (or 'cpu'), and CUDA_VISIBLE_DEVICES to choose GPUs"
                )
        per_round = self.feedbacks_per_round
        if self.feedback.budget < per_round:
            raise ValueError(
                f"feedback.budget ({self.feedback.budget}) is smaller than one round "
                f"(sampling.images_per_round x feedback.annotators_per_image = {per_round})"
            )
        return self

    def budget_problem(self) -> str | None:
        """What is wrong with a budget that is not a whole number of rounds (a run spends whole rounds
        and would leave the rest unspent, silently); None when it is. Asked of a new run only: a run
        stored by a release that allowed it resumes as it began."""
        per_round = self.feedbacks_per_round
        if not (left := self.feedback.budget % per_round):
            return None
        whole = self.feedback.budget - left
        rounds = f"{whole // per_round} round{'' if whole == per_round else 's'}"
        return (
            f"feedback.budget ({self.feedback.budget}) is {rounds} of {per_round} "
            f"feedbacks (sampling.images_per_round x feedback.annotators_per_image) and {left} more, "
            f"which no round spends: give {whole} or {whole + per_round}"
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs (see load_config); the environment overrides it.
        return env_settings, init_settings, file_secret_settings

    # Derived quantities, printed and checked before a run (ddpo-pytorch style).
    @property
    def feedbacks_per_round(self) -> int:
        return self.sampling.images_per_round * self.feedback.annotators_per_image

    @property
    def rounds(self) -> int:
        return self.feedback.budget // self.feedbacks_per_round

    @property
    def optimizer_steps_per_round(self) -> int:
        passes = -(-self.sampling.images_per_round // self.ddpo.train_batch_size)
        return self.ddpo.inner_epochs * -(-passes // self.ddpo.gradient_accumulation_steps)

    def derived(self) -> dict[str, int]:
        return {
            "rounds": self.rounds,
            "feedbacks_per_round": self.feedbacks_per_round,
            "feedbacks_spent": self.rounds * self.feedbacks_per_round,
            "ddpo_optimizer_steps_per_round": self.optimizer_steps_per_round,
        }

    def without_secrets(self) -> HeroConfig:
        """A copy with every secret None, for a process that uses no service (a run's others)."""
        update = {}
        for section in type(self).model_fields:
            if isinstance(value := getattr(self, section), BaseModel) and (names := _secret_fields(section)):
                update[section] = value.model_copy(update=dict.fromkeys(names))
        return self.model_copy(update=update)

    def to_public_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every secret masked: safe for logs, MLflow params and files."""
        return self.model_dump(mode="json")

    def to_file_dict(self) -> dict[str, Any]:
        """The public dict as a config file holds it: secrets null (a file never carries one; the
        environment does), so that reading the file back never takes a mask for a secret."""
        data = self.to_public_dict()
        for section, fields in data.items():
            if isinstance(fields, dict):
                fields.update(dict.fromkeys(_secret_fields(section)))
        return data

    def to_commented_yaml(self) -> str:
        """The config as YAML, each field preceded by its description: a self-documenting config file.

        Secrets are written as null with a note: they belong in the environment, never in a file.
        """
        return "\n".join(_commented_lines(self, self.to_public_dict(), path=())) + "\n"


def _commented_lines(model: BaseModel, values: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    indent = "  " * len(path)
    lines = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines += ["", f"{indent}{name}:", *_commented_lines(value, values[name], (*path, name))]
            continue
        wrapped = textwrap.wrap(field.description or "", width=100 - len(indent))
        lines += [f"{indent}# {line}" for line in wrapped]
        if isinstance(value, SecretStr):
            variable = ENV_PREFIX + ENV_NESTED_DELIMITER.join((*path, name)).upper()
            lines.append(f"{indent}{name}: null  # set, not shown: give it through {variable}")
            continue
        dumped = yaml.safe_dump({name: values[name]}, default_flow_style=True, width=10_000)
        lines.append(indent + dumped.strip().removeprefix("{").removesuffix("}"))
    return lines


class _GivenValuesConfig(HeroConfig):
    """The same tree validated from the given values alone, the environment not consulted: what is
    given already went through it (overrides, a stored run's config)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def secret_variables() -> list[str]:
    """The environment variables that can carry a secret: HERO_<SECTION>__<FIELD> of each SecretStr
    field, and HERO_<SECTION> (a section given as JSON) of each section holding one."""
    names = []
    for section, field in HeroConfig.model_fields.items():
        is_section = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        if is_section and (fields := sorted(_secret_fields(section))):
            names.append(f"{ENV_PREFIX}{section}".upper())
            names += [f"{ENV_PREFIX}{section}{ENV_NESTED_DELIMITER}{name}".upper() for name in fields]
    return names


def _secret_fields(section: str) -> set[str]:
    """The fields of a config section typed SecretStr (set or not)."""
    model = HeroConfig.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    fields = model.model_fields.items()
    return {name for name, field in fields if SecretStr in (field.annotation, *get_args(field.annotation))}


def _beside(local_root: Path) -> str:
    """The tracking URI of a run store's own SQLite file: mlflow.db in local_root."""
    return f"sqlite:///{local_root.as_posix()}/mlflow.db"


def with_overrides(
    config: HeroConfig, overrides: dict[str, dict[str, Any] | Any], given_by: dict[str, str] | None = None
) -> HeroConfig:
    """The config with `overrides` ({section: {field: value}} or {field: value}) applied on top of
    everything else (command-line flags beat the file and the environment), validated again.
    given_by: where each override came from, by dotted field ({"feedback.budget": "--budget"}): a
    problem with one names it, as one with an environment variable's value names the variable.

    Overrides come from command-line flags and deployment parameters, which Prefect stores in plain
    text: a secret is refused there (it belongs in the worker's environment)."""
    if not isinstance(overrides, dict):  # a deployment's `config` parameter is free-form JSON
        raise ConfigError(
            f'overrides: a mapping of sections and fields is wanted, e.g. {{"feedback": {{"budget": '
            f"256}}}}, got a {type(overrides).__name__}"
        )
    data = config.model_dump()
    if data["tracking"]["tracking_uri"] == _beside(config.storage.local_root):
        del data["tracking"]["tracking_uri"]  # derived from local_root: derived again, from an override's
    for key, value in overrides.items():
        if key not in data:
            raise ConfigError(f"override {key!r}: no such setting (the top level has {', '.join(data)})")
        if not isinstance(data[key], dict):
            data[key] = value
            continue
        if not isinstance(value, dict):  # not shown: in a section's place, it may be a secret
            raise ConfigError(
                f"override {key!r}: a section takes a mapping of its fields, got a {type(value).__name__}"
            )
        for name in value:
            if name in _secret_fields(key):
                variable = ENV_PREFIX + ENV_NESTED_DELIMITER.join((key, name)).upper()
                raise ConfigError(
                    f"override {key}.{name}: a secret is not taken as an override (deployment parameters "
                    f"are stored in plain text); set {variable} in the worker's environment"
                )
        data[key] = {**data[key], **value}
    try:
        return _GivenValuesConfig(**data)
    except ValidationError as err:
        problems = format_validation_error(err, given_by=given_by)
        raise ConfigError(f"invalid configuration:\n{problems}") from None


def restore_config(stored: dict[str, Any], current: HeroConfig) -> HeroConfig:
    """A run's stored public config back as a HeroConfig: what the run learns and how its rounds close
    as stored (the environment of the process resuming it, a service's or another worker's, does not
    change them); the service settings, secrets included (never stored), from `current`."""
    data = json.loads(json.dumps(stored))  # a deep copy
    now = current.model_dump()  # SecretStr stays SecretStr
    for section, fields in now.items():
        if not isinstance(fields, dict):
            continue
        if is_service_setting(section):
            data[section] = fields
        elif isinstance(data.get(section, {}), dict):  # a section a later release added: its defaults
            service = {name: value for name, value in fields.items() if is_service_setting(section, name)}
            data[section] = {**data.get(section, {}), **service}
    try:
        return _GivenValuesConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"the stored run config is no longer valid:\n{format_validation_error(err)}"
        ) from None


def load_config(path: Path | None = None) -> HeroConfig:
    """Load a config: defaults <- YAML file (optional) <- HERO_* environment variables. Without a
    path, the file named by HERO_CONFIG_FILE is read when set (a worker's or service's base config)."""
    data: dict[str, Any] = {}
    named_by = ""
    if path is None and os.environ.get(CONFIG_FILE_ENV):
        path, named_by = Path(os.environ[CONFIG_FILE_ENV]), f" (named by {CONFIG_FILE_ENV})"
    if path is not None:
        try:
            data = _read_yaml(path)
        except ConfigError as err:
            raise ConfigError(f"{err}{named_by}") from None
    _check_environment()
    try:
        return HeroConfig(**data)
    except ValidationError as err:
        where = f" in {path}{named_by}" if path is not None else ""
        problems = format_validation_error(err, from_environment=True)
        raise ConfigError(f"invalid configuration{where}:\n{problems}") from None
    except SettingsError as err:  # a section variable (HERO_SAMPLING) that is not JSON
        raise ConfigError(
            f"invalid configuration in the environment: {err}. A section's variable takes a JSON "
            "object; or set its fields one by one (HERO_SAMPLING__NUM_STEPS=20)"
        ) from None


def _check_environment() -> None:
    """A HERO_<SECTION>__<FIELD> variable of no section would be ignored: a typo, refused (a typo in
    a field is refused by the section itself). So would a top-level setting misspelt (`runid`): a
    name close to a setting's that is not one of OTHER_ENV_VARIABLES is refused too. Names are read
    whatever their case (as pydantic-settings reads them); one setting given twice in two cases is
    refused (which one wins would depend on the order of the environment)."""
    sections = _section_names()
    cases: dict[str, list[str]] = {}
    for given in os.environ:
        if given.upper().startswith(ENV_PREFIX):
            cases.setdefault(given.upper(), []).append(given)
    for variants in cases.values():
        if len(variants) > 1:
            raise ConfigError(
                f"environment variables {' and '.join(sorted(variants))} set the same setting (names are "
                "read whatever their case): unset all but one"
            )
    for given in os.environ:
        variable = given.upper()
        name = variable.removeprefix(ENV_PREFIX).lower()
        if (  # first: a section and field joined by one underscore means the field, not the section
            variable.startswith(ENV_PREFIX)
            and ENV_NESTED_DELIMITER not in variable
            and variable.upper() not in OTHER_ENV_VARIABLES
            and (section := next((s for s in sections if name.startswith(f"{s}_")), None)) is not None
        ):
            field = name.removeprefix(f"{section}_").upper()
            meant = f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{field}"
            raise ConfigError(
                f"environment variable {given} is not a setting: a section's field takes two "
                f"underscores after the section, did you mean {meant}? Unset or rename it"
            )
        if (
            variable.startswith(ENV_PREFIX)
            and ENV_NESTED_DELIMITER not in variable
            and variable.upper() not in OTHER_ENV_VARIABLES
            and name not in HeroConfig.model_fields
            and (close := difflib.get_close_matches(name, HeroConfig.model_fields, n=1, cutoff=0.8))
        ):
            raise ConfigError(
                f"environment variable {given} is not a setting: did you mean "
                f"{ENV_PREFIX}{close[0].upper()}? Unset or rename it"
            )
        if variable.startswith(ENV_PREFIX) and ENV_NESTED_DELIMITER in variable:
            section = variable.removeprefix(ENV_PREFIX).split(ENV_NESTED_DELIMITER)[0].lower()
            if section not in sections:
                raise ConfigError(
                    f"environment variable {given}: {section!r} is not a config section (sections: "
                    f"{', '.join(sections)}); unset or rename it"
                )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one and
    drops the first unseen: a second `model:` section would erase the first). Merge keys (<<) may still
    be overridden, as YAML means them to be."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) or key is None:
                if key in seen:
                    first = f"{key!r} is given twice (first on line {seen[key]})"
                    raise yaml.constructor.ConstructorError(None, None, first, key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML text as plain data (a SafeLoader: no Python objects), refusing a key given twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (model:, sampling:, ...), not a {type(data).__name__}"
        )
    sections = _section_names()
    for key in data:
        if not isinstance(key, str):  # YAML reads 1:, true: and null: as a number, a bool, None
            raise ConfigError(
                f"{path}: {key!r} is not a setting's name: the top level holds sections (model:, "
                "sampling:, ...)"
            )
        if key not in HeroConfig.model_fields and key.lower() in HeroConfig.model_fields:
            # pydantic-settings would take it whatever its case: past the secret check below, and
            # beside a lower-case twin one of the two would be dropped unseen
            raise ConfigError(f"{path}: {key}: settings' names are lower case: write {key.lower()}")
        if key in sections and not isinstance(data[key], dict):
            # refused here: an environment variable for one of its fields would replace it unseen. Its
            # value is not shown: in a section's place it may be a secret
            got = "nothing" if data[key] is None else f"a value of type {type(data[key]).__name__}"
            raise ConfigError(
                f"{path}: section {key}: takes a mapping of its fields ({key}: then indented 'field: value' "
                f"lines), got {got}; give its fields or remove it"
            )
        for name in _secret_fields(key) if key in sections else ():
            # files are copied, committed and shown: never a secret (a stored config's mask is said below)
            if data[key].get(name) not in (None, SECRET_MASK):
                variable = f"{ENV_PREFIX}{key.upper()}{ENV_NESTED_DELIMITER}{name.upper()}"
                raise ConfigError(
                    f"{path}: {key}.{name} is a secret: set it in the environment ({variable}) or a "
                    "secrets store, not in a config file, and remove it from the file"
                )
    return data


def _section_names() -> list[str]:
    return [
        name
        for name, field in HeroConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    ]


def model_uri_problem(uri: str) -> str | None:
    """What makes `uri` no URI of a registered version, None if nothing."""
    if MODEL_URI.fullmatch(uri):
        return None
    return f"{uri!r} is not a model URI: write models:/NAME@ALIAS or models:/NAME/VERSION"


def alias_problem(alias: str) -> str | None:
    """What makes `alias` no alias a registry version can be given (MLflow's rules), None if nothing."""
    if not re.fullmatch(r"[\w-]{1,255}", alias):
        return "an alias is 1 to 255 letters, digits, '_' and '-': e.g. 'champion'"
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        return "'latest' and v<number> are MLflow's own aliases: choose another, e.g. 'champion'"
    return None


def format_validation_error(
    err: ValidationError,
    root: type[BaseModel] | None = None,
    from_environment: bool = False,
    given_by: dict[str, str] | None = None,
) -> str:
    """One line per problem: dotted field path, reason, and the offending value unless secret.

    root: the model validated (HeroConfig by default); it tells which fields are secrets.
    from_environment: name the HERO_* variable a value came from (it beats the file), where one did.
    given_by: the source of a value by dotted field (a command-line flag), named where one is.
    """
    lines = []
    for problem in err.errors(include_url=False):
        path = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        # a validator's own message, without pydantic's "Value error, " before it
        line = f"  {path}: {problem['msg'].removeprefix('Value error, ')}"
        given = problem["input"]
        shown = (
            _may_echo(problem["loc"], root or HeroConfig)
            and not isinstance(given, dict)
            # a URL with user:password@ is not echoed: in a message its password may hold what ends a
            # URL in text (a space), which redact below cannot see past
            and not (isinstance(given, str) and url_userinfo(given) is not None)
        )
        if problem["type"] not in {"missing", "extra_forbidden", SECRET_IN_VALUE} and shown:
            line += f" (got {_echo(given)})"
        if problem["type"] == "extra_forbidden":
            line += _known_fields(problem["loc"], root or HeroConfig)
        if problem["type"] == "string_pattern_mismatch" and (
            about := _description(problem["loc"], root or HeroConfig)
        ):
            line += f": {about}"  # a regex says what is wanted to few readers; the field's description does
        if from_environment and (variable := _environment_variable(problem["loc"])) is not None:
            line += f" [set by {variable}]"
        if given_by and path in given_by:
            line += f" [set by {given_by[path]}]"
        if not problem["loc"]:  # a check across settings: where each setting it names came from
            for named in dict.fromkeys(_SETTING_NAME.findall(problem["msg"])):
                source = (given_by or {}).get(named)
                if source is None and from_environment:
                    source = _environment_variable(tuple(named.split(".")))
                if source is not None:
                    line += f" [{named} set by {source}]"
        lines.append(redact(line))  # a URL refused for another reason may still hold credentials
    return "\n".join(lines)


_SETTING_NAME = re.compile(r"\b[a-z0-9_]+\.[a-z0-9_]+\b")  # section.field, as messages name settings


def _echo(value: Any, limit: int = 120) -> str:
    """A refused value as shown in an error: its repr, cut (a YAML alias bomb expands to megabytes)."""
    shown = _ECHO.repr(value)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = 120
_ECHO.maxlevel = 2


def _environment_variable(loc: tuple[int | str, ...]) -> str | None:
    """The HERO_* variable that sets the field at `loc` (or its section, as JSON), if one is set."""
    present = {name.upper(): name for name in os.environ}  # pydantic-settings ignores the case
    for end in range(len(loc), 0, -1):
        variable = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part) for part in loc[:end]).upper()
        if variable in present:
            return present[variable]
    return None


def _description(loc: tuple[int | str, ...], model: type[BaseModel]) -> str | None:
    """The description of the field at `loc`, if it is one."""
    field = None
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            model = field.annotation
    return field.description if field is not None else None


def _known_fields(loc: tuple[int | str, ...], model: type[BaseModel]) -> str:
    """What an unknown field might have been meant as: the closest known names, or all of them."""
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=3, cutoff=0.6)
    if close:
        return f"; did you mean {' or '.join(repr(name) for name in close)}?"
    return f"; the fields here: {', '.join(known)}"


def _may_echo(loc: tuple[int | str, ...], model: type[BaseModel]) -> bool:
    """Whether the value given at `loc` may be shown in an error: not at the top level or a section
    (whatever was put in its place may hold secrets), not at a SecretStr field."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:  # past the known fields (a list item, an unknown name): a plain value
            return True
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "SecretStr" not in str(annotation)
        model = annotation
    return False
