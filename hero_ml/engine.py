"""One round of online learning from feedback: `generate()` a batch, then `learn(batch, feedback)`.

The engine holds what a run learns: the LoRA on the pipeline's UNet and its optimiser, the feedback
encoder and its optimiser, the current best image (its x_T, encoder latent and pixels), the good
noises of the last round (the guidance pool), the round index and the feedbacks spent. It knows
nothing of orchestration, annotators or trackers; its only I/O is `save`/`load` through an
ArtifactStore. Every random draw comes from a generator derived from (seed, round, purpose), so a
run resumed from any saved round continues bit for bit as if it had never stopped.

Methods (config `method`), all on the same rounds and the same feedback:
- hero: encoder trained on triplets, reward = similarity to the best, DDPO, feedback-guided noise.
- hero-noguide: the same from plain N(0, I) noise every round.
- ddpo-binary: DDPO on reward 1 for good and 0 for bad; no encoder.
- d3po: pairwise good-over-bad preferences against the adapter-free reference policy.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionPipeline
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hero_ml.adapters.storage import ArtifactStore
from hero_ml.config import HeroConfig, SamplingConfig, format_validation_error
from hero_ml.d3po import d3po_objective, preference_pairs
from hero_ml.ddpo import StepObjective, UpdateStats, advantages, ddpo_objective, update_pass
from hero_ml.diffusion.lora import add_lora, remove_lora
from hero_ml.diffusion.pipeline import DTYPES
from hero_ml.diffusion.sampler import (
    PER_IMAGE_TENSORS,
    Trajectory,
    per_image_generators,
    sample_trajectories,
)
from hero_ml.encoder import FeedbackEncoder, TripletSource, train_encoder
from hero_ml.errors import HeroError
from hero_ml.faults import crash_point
from hero_ml.feedback import RoundFeedback
from hero_ml.guidance import NoisePool
from hero_ml.rewards import mean_similarity_to_good, similarity_to_best, with_labels

if TYPE_CHECKING:
    from hero_ml.parallel import DataParallel

CHECKPOINT_FORMAT = 2  # 2: state.json records the tensors' size and sha256
TENSORS = "state.safetensors"
STATE = "state.json"  # written last: it commits the checkpoint
# Each purpose draws from its own stream, so changing how much one consumes never shifts another.
_PURPOSES = {"guidance": 1, "encoder": 2, "update": 3, "pairs": 4}


class CheckpointTensors(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CheckpointState(BaseModel):
    """state.json of a checkpoint, as `Engine.save` writes it: read back only when it is this."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: int
    tensors: CheckpointTensors
    method: str
    round: int = Field(ge=0)
    feedbacks: int = Field(ge=0)
    replay_rounds: int = Field(ge=0)
    optimizers: dict[str, dict[str, Any]]
    loss_scale: dict[str, float | int] | None = None  # a float16 model's GradScaler state


class EngineError(HeroError, RuntimeError):
    """The engine was asked something that does not fit its state (a stale batch, a bad checkpoint)."""


@dataclass(frozen=True)
class RoundBatch:
    """A generated round: image ids (as annotators see them) and the recorded trajectories."""

    round: int
    image_ids: tuple[str, ...]
    trajectory: Trajectory


@dataclass(frozen=True)
class RoundStats:
    """What one round of learning did, for tracking (every figure is a float or int)."""

    round: int
    feedbacks: int  # spent so far, this round included
    good: int
    bad: int
    new_best: bool
    label_agreement: float
    encoder_loss_first: float | None  # None: the method has no encoder or the round had no triplets
    encoder_loss_last: float | None
    reward_good_mean: float | None
    reward_bad_mean: float | None
    update_loss: float | None  # None: nothing to learn this round (equal rewards, no pairs)
    approx_kl: float | None
    clip_fraction: float | None
    optimizer_steps: int
    # How far this round's update moved the LoRA (L2 norm of the change); None: no update, or a
    # round recorded before the figure existed.
    lora_step_norm: float | None = None
    skipped_steps: int = 0  # optimiser steps not taken: their gradient was not finite
    non_finite_images: int = 0  # images whose latents were not finite: left out of the encoder's triplets
    # When the round was learned, set as it is stored: its metrics' time in the tracker, so that tracking
    # it again after a crash leaves one point; None: not stored yet, or recorded before the field existed.
    learned_at: AwareDatetime | None = None

    def metrics(self) -> dict[str, float]:
        """The figures (not the round, which is the step, nor the time)."""
        figures = asdict(self)
        del figures["round"], figures["learned_at"]
        return {k: float(v) for k, v in figures.items() if v is not None}


def sample_batch(
    pipe: StableDiffusionPipeline,
    sampling: SamplingConfig,
    round_index: int,
    *,
    initial_noise: torch.Tensor | None = None,
    on_step: Callable[[], None] | None = None,
    parallel: DataParallel | None = None,
) -> RoundBatch:
    """Sample round `round_index` as configured: `images_per_round` images of the prompt, each with its
    own random stream seeded by (sampling.seed, round, image), from `initial_noise` or plain N(0, I).

    parallel: each process samples its share of the images and every process gets the whole round."""
    count = sampling.images_per_round
    prompts = [sampling.prompt] * count
    mine = slice(0, count) if parallel is None else parallel.images(count)
    trajectory = sample_trajectories(
        pipe,
        prompts[mine],
        per_image_generators((sampling.seed, round_index), count)[mine],
        num_steps=sampling.num_steps,
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        initial_noise=None if initial_noise is None else initial_noise[mine],
        negative_prompt=sampling.negative_prompt,
        sub_batch_size=sampling.sub_batch_size,
        storage_dtype=DTYPES[sampling.storage_dtype],
        on_step=on_step,
    )
    if parallel is not None:
        trajectory = _gather(trajectory, parallel, prompts)
    image_ids = tuple(f"r{round_index:04d}-{i:03d}" for i in range(count))
    return RoundBatch(round=round_index, image_ids=image_ids, trajectory=trajectory)


def _gather(share: Trajectory, parallel: DataParallel, prompts: list[str]) -> Trajectory:
    """The whole round of `prompts` from every process's share of it, in image order, on the CPU."""
    per_image = {name: parallel.gather(getattr(share, name)).cpu() for name in PER_IMAGE_TENSORS}
    return replace(share, prompts=prompts, **per_image)  # type: ignore[arg-type]


class Engine:
    def __init__(
        self, config: HeroConfig, pipe: StableDiffusionPipeline, parallel: DataParallel | None = None
    ):
        """Attach a fresh LoRA to `pipe` (its UNet must have none) and build the method's learners.

        parallel: this process's place in a data-parallel run (hero_ml/parallel.py); every process
        holds the same engine and sees the whole round, and each computes its share of it."""
        if parallel is not None:  # said before anything is sampled, not at the first round's gather
            parallel.images(config.sampling.images_per_round)
        self.config = config
        self.pipe = pipe
        self.parallel = parallel
        self.method = config.method
        unet_config = pipe.unet.config
        self.latent_shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
        self.encoder: FeedbackEncoder | None = None
        # seeded initialisation; the caller's RNG (the CPU's and the model's GPU's) left as it was
        device = pipe.unet.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(config.sampling.seed)
            self.lora_params = add_lora(
                pipe.unet,
                rank=config.model.lora_rank,
                alpha=config.model.lora_alpha,
                init=config.model.lora_init,
            )
            if self.method in ("hero", "hero-noguide"):
                self.encoder = FeedbackEncoder(self.latent_shape).to(pipe.unet.device)
        lr = config.d3po.lr if self.method == "d3po" else config.ddpo.lr
        self.lora_optimizer = torch.optim.AdamW(
            self.lora_params, lr=lr, weight_decay=config.ddpo.weight_decay
        )
        # float16 weights: the policy's gradients need a loss scale to survive the backward pass
        self.loss_scaler = (
            torch.amp.GradScaler(pipe.unet.device.type) if config.model.dtype == "float16" else None
        )
        self.encoder_optimizer: torch.optim.Optimizer | None = None
        if self.encoder is not None:
            self.encoder_optimizer = torch.optim.Adam(self.encoder.parameters(), lr=config.encoder.lr)
        self.round = 0
        self.feedbacks = 0
        self.best_noise: torch.Tensor | None = None  # x_T of the current best
        self.best_latent: torch.Tensor | None = None  # its encoder input
        self.best_image: torch.Tensor | None = None  # its pixels, (H, W, 3) uint8, shown to annotators
        # x_T of the last round's good images but a new best (the best's is best_noise)
        self.good_noises = torch.empty(0, *self.latent_shape)
        self.replay: list[TripletSource] = []  # earlier rounds' triplet sources, when encoder.replay

    # -- a round -------------------------------------------------------------------------------

    def generate(self, on_step: Callable[[], None] | None = None) -> RoundBatch:
        """Sample this round's images. Deterministic in (seed, round, state): generating twice gives
        the same batch, so a crashed round is regenerated identically."""
        sampling = self.config.sampling
        count = sampling.images_per_round
        initial_noise = None
        if (pool := self.noise_pool()) is not None:
            initial_noise = pool.sample(count, self._generator("guidance"))
        return sample_batch(
            self.pipe,
            sampling,
            self.round,
            initial_noise=initial_noise,
            on_step=on_step,
            parallel=self.parallel,
        )

    def learn(
        self,
        batch: RoundBatch,
        feedback: RoundFeedback,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> RoundStats:
        """Learn from the feedback on `batch` and advance to the next round. An exception leaves the
        engine part-way through the round: reload it from its last checkpoint (a resumed run does).
        on_progress(phase, done, total): "training the encoder" (epochs), then "updating the LoRA"
        (optimiser steps), each told 0 as it starts and then after every epoch or step."""
        progress = on_progress or (lambda phase, done, total: None)
        if batch.round != self.round:
            raise EngineError(f"the batch is of round {batch.round}, the engine is at round {self.round}")
        if len(batch.trajectory) != len(batch.image_ids):
            raise EngineError(
                f"the batch holds {len(batch.trajectory)} trajectories for {len(batch.image_ids)} image ids"
            )
        if feedback.image_ids != batch.image_ids:
            raise EngineError("the feedback's image ids are not this batch's: it was given for another round")
        if feedback.best is None and self.best_noise is None:
            raise EngineError("the first round's feedback must pick a best: there is none to keep")
        trajectory = batch.trajectory
        latents = trajectory.final_step_input.float()
        good, bad = feedback.good_indices, feedback.bad_indices
        # An image whose encoder input is not finite (a float16 overflow while sampling) would turn the
        # encoder's weights to NaN for good, and every later reward with them: it is left out of the
        # triplets and the good noises, and counted (RoundStats.non_finite_images). Picked as best, it
        # cannot anchor the encoder: the current best stays (the round's stats say no new best).
        finite = latents.flatten(1).isfinite().all(dim=1)
        best = feedback.best
        if best is not None and not finite[best]:
            if self.best_noise is None:
                raise EngineError(
                    f"the first round's best, {batch.image_ids[best]!r}, has latents that are not finite "
                    "(an overflow while sampling in float16): with no best to anchor the encoder, the "
                    "run cannot go on from this round; start a new run in bfloat16 or float32 "
                    "(model.dtype)"
                )
            best = None
        # The good images besides a new best: the guidance's good noises and the triplets' positives. The
        # best is neither (it has its own share of the next batch, and it is the triplets' anchor), as in
        # the reference, which removes the new best from them.
        positives = [i for i in good if i != feedback.best and finite[i]]
        finite_good, finite_bad = [i for i in good if finite[i]], [i for i in bad if finite[i]]
        if best is not None:
            self.best_noise = trajectory.initial_noise[best].float().clone()
            self.best_latent = latents[best].clone()
            self.best_image = trajectory.images[best].clone()
        self.good_noises = trajectory.initial_noise[positives].float().clone()

        encoder_losses: list[float] = []
        rewards: torch.Tensor | None = None
        objective: StepObjective | None = None
        units = len(trajectory)
        if self.method in ("hero", "hero-noguide"):
            encoder_losses, rewards = self._encoder_round(
                latents,
                positives,
                finite_bad,
                lambda done, total: progress("training the encoder", done, total),
            )
            crash_point("encoder")
        elif self.method == "ddpo-binary":
            rewards = torch.tensor(feedback.good, dtype=torch.float32)
        if rewards is not None:
            advantage = advantages(rewards, self.config.ddpo.adv_clip_max)
            if advantage.abs().sum() > 0:
                objective = ddpo_objective(
                    self.pipe,
                    trajectory,
                    advantage,
                    self.config.ddpo.clip_range,
                    kl_to_base=self.config.ddpo.kl_to_base,
                )
        else:  # d3po
            pairs = preference_pairs(good, bad, self._generator("pairs"))
            if len(pairs):
                d3po = self.config.d3po
                objective = d3po_objective(self.pipe, trajectory, pairs, beta=d3po.beta, eps=d3po.clip_eps)
                units = len(pairs)
        update = None
        if objective is not None:
            update = self._update(
                objective,
                units,
                trajectory.num_steps,
                lambda done, total: progress("updating the LoRA", done, total),
            )

        self.round += 1
        self.feedbacks += feedback.feedbacks
        return RoundStats(
            round=batch.round,
            feedbacks=self.feedbacks,
            good=len(good),
            bad=len(bad),
            new_best=best is not None,
            label_agreement=feedback.label_agreement,
            encoder_loss_first=encoder_losses[0] if encoder_losses else None,
            encoder_loss_last=encoder_losses[-1] if encoder_losses else None,
            reward_good_mean=_mean(rewards, finite_good),
            reward_bad_mean=_mean(rewards, finite_bad),
            update_loss=update.loss if update else None,
            approx_kl=update.approx_kl if update else None,
            clip_fraction=update.clip_fraction if update else None,
            optimizer_steps=update.optimizer_steps if update else 0,
            lora_step_norm=update.step_norm if update else None,
            skipped_steps=update.skipped_steps if update else 0,
            non_finite_images=int((~finite).sum()),
        )

    def predicted_rewards(self, batch: RoundBatch) -> list[float] | None:
        """The current encoder's reward of each image of a batch before any feedback on it (for
        suggestions to annotators); None without an encoder or before the first best."""
        if self.encoder is None or self.best_latent is None:
            return None
        features, best = self._features(batch.trajectory.final_step_input.float())
        return similarity_to_best(features, best).tolist()

    def _features(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's pre-head features of `latents` and of the current best, on the CPU."""
        assert self.encoder is not None and self.best_latent is not None
        device = next(self.encoder.parameters()).device
        with torch.no_grad():
            features = self.encoder.features(latents.to(device)).cpu()
            best = self.encoder.features(self.best_latent[None].to(device)).cpu()[0]
        return features, best

    def _encoder_round(
        self,
        latents: torch.Tensor,
        positives: list[int],
        bad: list[int],
        on_epoch: Callable[[int, int], None],
    ) -> tuple[list[float], torch.Tensor]:
        """Train the encoder on this round's triplets (and earlier ones, with replay); reward every image.
        positives: the good images other than the best (the anchor)."""
        assert (
            self.encoder is not None and self.encoder_optimizer is not None and self.best_latent is not None
        )
        encoder_config = self.config.encoder
        source = TripletSource(anchor=self.best_latent.clone(), good=latents[positives], bad=latents[bad])
        if encoder_config.replay:
            self.replay.append(source)
        losses = train_encoder(
            self.encoder,
            self.encoder_optimizer,
            self.replay if encoder_config.replay else [source],
            epochs=encoder_config.epochs_per_round,
            triplets_per_epoch=encoder_config.triplets_per_epoch,
            margin=encoder_config.margin,
            generator=self._generator("encoder"),
            on_epoch=on_epoch,
        )
        if self.parallel is not None:  # rank 0's encoder everywhere: the rewards must agree
            with torch.no_grad():
                for tensor in self.encoder.state_dict().values():
                    tensor.copy_(self.parallel.broadcast(tensor))
        features, best = self._features(latents)
        if encoder_config.reward == "best":
            return losses, similarity_to_best(features, best)
        if encoder_config.reward == "best_plus_label":
            good = torch.ones(len(latents), dtype=torch.bool)
            good[bad] = False
            return losses, with_labels(similarity_to_best(features, best), good)
        # the good images of this round and the best, which is good by definition (it may be older; the
        # reference's variant leaves it out, a side effect of taking a new best out of the positives)
        return losses, mean_similarity_to_good(features, torch.cat([features[positives], best[None]]))

    def _update(
        self, objective: StepObjective, units: int, num_steps: int, on_step: Callable[[int, int], None]
    ) -> UpdateStats:
        ddpo = self.config.ddpo
        return update_pass(
            objective,
            self.lora_optimizer,
            units=units,
            num_steps=num_steps,
            timesteps_per_unit=ddpo.timesteps_per_trajectory,
            train_batch_size=ddpo.train_batch_size,
            gradient_accumulation_steps=ddpo.gradient_accumulation_steps,
            inner_epochs=ddpo.inner_epochs,
            max_grad_norm=ddpo.max_grad_norm,
            generator=self._generator("update"),
            target_kl=ddpo.target_kl,
            parallel=self.parallel,
            scaler=self.loss_scaler,
            on_step=on_step,
        )

    def noise_pool(self) -> NoisePool | None:
        """What the next round's guided noises are drawn from (hero after a round; None otherwise)."""
        if self.method != "hero" or self.best_noise is None:
            return None
        guidance = self.config.guidance
        return NoisePool(
            self.best_noise,
            self.good_noises,
            guidance.best_ratio,
            guidance.noise_eps,
            self.config.sampling.prompt,
        )

    def _generator(self, purpose: str) -> torch.Generator:
        return per_image_generators((self.config.sampling.seed, self.round, _PURPOSES[purpose]), 1)[0]

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, store: ArtifactStore, prefix: str) -> None:
        """Write the whole state under `prefix`: tensors (safetensors), then the JSON that commits them."""
        tensors: dict[str, torch.Tensor] = {
            f"lora.{name}": p.detach() for name, p in self.pipe.unet.named_parameters() if p.requires_grad
        }
        optimizers = {"lora": _optimizer_to(self.lora_optimizer, "optim.lora", tensors)}
        if self.encoder is not None and self.encoder_optimizer is not None:
            tensors |= {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
            optimizers["encoder"] = _optimizer_to(self.encoder_optimizer, "optim.encoder", tensors)
        tensors["good_noises"] = self.good_noises
        if self.best_noise is not None:
            assert self.best_latent is not None and self.best_image is not None
            tensors |= {
                "best.noise": self.best_noise,
                "best.latent": self.best_latent,
                "best.image": self.best_image,
            }
        for index, source in enumerate(self.replay):
            tensors |= {f"replay.{index}.{part}": getattr(source, part) for part in ("anchor", "good", "bad")}
        blob = save_tensors({k: v.contiguous().cpu() for k, v in tensors.items()})
        state = {
            "format": CHECKPOINT_FORMAT,
            "tensors": {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()},
            "method": self.method,
            "round": self.round,
            "feedbacks": self.feedbacks,
            "replay_rounds": len(self.replay),
            "optimizers": optimizers,
            "loss_scale": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
        }
        store.put(f"{prefix}/{TENSORS}", blob)
        crash_point("checkpoint.tensors")
        store.put(f"{prefix}/{STATE}", json.dumps(state, indent=1).encode())

    @classmethod
    def load(
        cls,
        config: HeroConfig,
        pipe: StableDiffusionPipeline,
        store: ArtifactStore,
        prefix: str,
        parallel: DataParallel | None = None,
    ) -> Engine:
        """An engine on `pipe` (without a LoRA) restored from a checkpoint written by `save`; parallel:
        as for a new engine (every process loads the same checkpoint)."""
        return cls.restored(config, pipe, *read_checkpoint(store, prefix), prefix, parallel)

    @classmethod
    def restored(
        cls,
        config: HeroConfig,
        pipe: StableDiffusionPipeline,
        state_json: bytes,
        blob: bytes,
        prefix: str,
        parallel: DataParallel | None = None,
    ) -> Engine:
        """An engine restored from a checkpoint's two files as read_checkpoint returns them (how a run's
        other processes get rank 0's); prefix: where they were read, for the messages."""
        try:
            raw = json.loads(state_json)
        except ValueError as err:
            raise EngineError(f"{prefix}/{STATE} is not JSON: {err}") from None
        if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise EngineError(f"checkpoint {prefix!r} has format {found!r}, expected {CHECKPOINT_FORMAT}")
        try:
            state = CheckpointState.model_validate(raw)
        except ValidationError as err:
            raise EngineError(
                f"{prefix}/{STATE} is not a checkpoint's state (edited, or written by another program):\n"
                f"{format_validation_error(err, CheckpointState)}\n`hero storage verify RUN` lists what "
                "else is damaged"
            ) from None
        if len(blob) != state.tensors.bytes or hashlib.sha256(blob).hexdigest() != state.tensors.sha256:
            raise EngineError(
                f"checkpoint {prefix}/{TENSORS} does not match its {STATE} ({len(blob)} bytes): it was "
                "changed or truncated after it was written"
            )
        try:  # parsed, never unpickled: a checkpoint's bytes cannot run code
            tensors = load_tensors(blob)
        except (SafetensorError, ValueError) as err:
            raise EngineError(f"{prefix}/{TENSORS} is not a safetensors file: {err}") from None
        if state.method != config.method:
            raise EngineError(
                f"checkpoint {prefix!r} was trained with method {state.method!r}, the config says "
                f"{config.method!r}: resume with the run's own config"
            )
        engine = cls(config, pipe, parallel)
        try:
            engine._restore(state, tensors)
        except KeyError as missing:
            engine.detach()
            raise EngineError(
                f"checkpoint {prefix!r} lacks {missing}, which this config's engine needs (another "
                "method's or an edited checkpoint): resume with the run's own config"
            ) from None
        except (ValueError, RuntimeError, TypeError) as err:
            engine.detach()
            raise EngineError(f"checkpoint {prefix!r} does not fit this engine: {err}") from None
        return engine

    def detach(self) -> None:
        """Take this engine's LoRA off the pipeline (one refused after loading), so that the pipeline can
        take another engine's: a run falls back to the checkpoint before a damaged one."""
        remove_lora(self.pipe.unet)

    def _restore(self, state: CheckpointState, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():  # copy_ would broadcast a tensor of another shape: checked first
            for name, p in self.pipe.unet.named_parameters():
                if p.requires_grad:
                    p.copy_(_of_shape(tensors, f"lora.{name}", p.shape))
        _optimizer_from(self.lora_optimizer, "optim.lora", state.optimizers["lora"], tensors)
        if (state.loss_scale is None) != (self.loss_scaler is None):
            held = "lacks" if state.loss_scale is None else "holds"
            raise ValueError(f"it {held} a float16 loss scale, and model.dtype is {self.config.model.dtype}")
        if self.loss_scaler is not None and state.loss_scale is not None:
            _scaler_from(self.loss_scaler, state.loss_scale)
        if self.encoder is not None and self.encoder_optimizer is not None:
            prefix_len = len("encoder.")
            self.encoder.load_state_dict(
                {k[prefix_len:]: v for k, v in tensors.items() if k.startswith("encoder.")}
            )
            _optimizer_from(self.encoder_optimizer, "optim.encoder", state.optimizers["encoder"], tensors)
        self.round, self.feedbacks = state.round, state.feedbacks
        self.good_noises = _of_shape(tensors, "good_noises", self.latent_shape, batch=True)
        if "best.noise" in tensors:
            side = self.pipe.vae_scale_factor * self.latent_shape[-1]
            self.best_noise = _of_shape(tensors, "best.noise", self.latent_shape)
            self.best_latent = _of_shape(tensors, "best.latent", self.latent_shape)
            self.best_image = _of_shape(tensors, "best.image", (side, side, 3))
            if self.best_image.dtype != torch.uint8:
                raise ValueError(f"best.image is {self.best_image.dtype}, an image's pixels are uint8")
        self.replay = [
            TripletSource(
                anchor=_of_shape(tensors, f"replay.{i}.anchor", self.latent_shape),
                good=_of_shape(tensors, f"replay.{i}.good", self.latent_shape, batch=True),
                bad=_of_shape(tensors, f"replay.{i}.bad", self.latent_shape, batch=True),
            )
            for i in range(state.replay_rounds)
        ]


def read_checkpoint(store: ArtifactStore, prefix: str) -> tuple[bytes, bytes]:
    """The checkpoint under `prefix` as stored: its state JSON and its tensors (Engine.restored)."""
    try:
        return store.get(f"{prefix}/{STATE}"), store.get(f"{prefix}/{TENSORS}")
    except KeyError as missing:
        raise EngineError(f"no committed checkpoint at {prefix!r} (missing {missing})") from None


def _of_shape(
    tensors: dict[str, torch.Tensor], name: str, shape: Sequence[int], batch: bool = False
) -> torch.Tensor:
    """tensors[name], checked to be of `shape` (batch: a stack of any length of such)."""
    found = tuple(tensors[name].shape)
    if (found[1:] if batch else found) != tuple(shape) or (batch and not found):
        wanted = f"(N, {', '.join(map(str, shape))})" if batch else str(tuple(shape))
        raise ValueError(f"{name} has shape {found}, this engine's is {wanted}")
    return tensors[name]


def _scaler_from(scaler: torch.amp.GradScaler, saved: dict[str, float | int]) -> None:
    """Load a GradScaler's state: its scale and growth tracker; its factors stay the fresh scaler's (a
    state.json is not hashed, and an edited one must not set them, as for the optimisers)."""
    fresh = scaler.state_dict()
    scaler.load_state_dict(saved)
    found = scaler.state_dict()
    changed = [k for k in ("growth_factor", "backoff_factor", "growth_interval") if found[k] != fresh[k]]
    if changed:
        raise ValueError(
            f"its loss scale has {', '.join(f'{k} {found[k]}' for k in changed)}, not this engine's"
        )
    if not (math.isfinite(found["scale"]) and found["scale"] > 0):
        raise ValueError(f"its loss scale is {found['scale']}, a loss scale is a positive finite number")


def _mean(values: torch.Tensor | None, indices: list[int]) -> float | None:
    return float(values[indices].mean()) if values is not None and indices else None


def _optimizer_to(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """Put the optimiser's tensor state into `tensors`; return the rest (hyper-parameters) for JSON."""
    state_dict = optimizer.state_dict()
    scalars: dict[str, object] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _hyper_parameters(group: dict) -> dict[str, object]:
    """An optimiser group's learning rate, betas, eps and weight decay (as JSON keeps them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in _HYPER_PARAMETERS}


_HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")


def _optimizer_from(
    optimizer: torch.optim.Optimizer, prefix: str, saved: dict, tensors: dict[str, torch.Tensor]
) -> None:
    state: dict[int, dict[str, object]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    configured = [_hyper_parameters(group) for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    # the config's, as resume checked it: a state.json is not hashed, and an edited one must not set them
    for group, wanted in zip(optimizer.param_groups, configured, strict=True):
        if (found := _hyper_parameters(group)) != wanted:
            raise ValueError(f"{prefix} has hyper-parameters {found}, the config's are {wanted}")
    for group in optimizer.param_groups:  # a moment of another shape would fail only at the next step
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    raise ValueError(
                        f"{prefix} {key} has shape {tuple(value.shape)}, its parameter's is {tuple(p.shape)}"
                    )
