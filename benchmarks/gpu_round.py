"""The GPU round: one HERO round of SD 1.5 (random weights of the published shapes: the compute of the
real model), phase by phase, in several ways of running it, side by side in one process.

Each setup runs the engine (hero_ml/engine.py) on configs/sd15-paper.yaml for two rounds: round 0
warms up (allocator, kernels, torch.compile; its time is reported as `first_round_s`), round 1 is the
steady state measured phase by phase (sampling, VAE decode, encoder, DDPO), with the seconds, images/s,
peak GPU memory, and the UNet's achieved share of the GPU's bf16 dense peak. FLOPs are counted from
the model (torch.utils.flop_counter on one guided UNet call, with math attention so that every matmul
is seen), not guessed. Setups:

- hero: the paper config's fp16 weights (fp32 LoRA masters, a dynamic loss scale), the whole round
  in one sampling sub-batch, DDPO micro-batches of 8 (one optimiser step each: the same 8 optimiser
  steps as the reference);
- hero-bf16: the same in bf16 (no loss scale; its log-prob rounding is reported: too coarse for the
  paper's clip range);
- hero-compiled: hero with torch.compile on the UNet (compile time is in first_round_s);
- reference: the reference code's way: fp16, sampling and decoding in batches of 8, DDPO 2 x 4;
- diffusers: plain StableDiffusionPipeline generation of the same images (fp16, batches of 8, no
  trajectory recording, no learning), the floor any sampler is compared with.

    python benchmarks/gpu_round.py --device cuda                    # one GPU -> results/gpu_round.json
    python benchmarks/gpu_round.py --device cuda --memory-sweep     # + peak memory vs images a round
    torchrun --nproc-per-node 8 benchmarks/gpu_round.py --device cuda --setups hero --name gpu_round-8gpu
    python benchmarks/gpu_round.py --arch tiny --device cpu --images 8 --steps 4 --name gpu_round-cpu
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from results_io import write_result

import hero_ml.diffusion.sampler as sampler_module
from hero_ml.config import HeroConfig, load_config, with_overrides
from hero_ml.diffusion.pipeline import DTYPES, load_configured_pipeline, load_pipeline
from hero_ml.diffusion.sampler import guided_noise_pred, per_image_generators, recompute_log_probs
from hero_ml.engine import Engine, RoundBatch, sample_batch
from hero_ml.feedback import AnnotatorFeedback, ImageLabel, RoundFeedback, aggregate
from hero_ml.parallel import DataParallel

PAPER_CONFIG = Path(__file__).parent.parent / "configs" / "sd15-paper.yaml"
PHASES = ("sampling", "decode", "encoder", "ddpo")
MEMORY_PHASES = ("generate", "encoder", "ddpo")  # generate = sampling + decode
# bf16 dense tensor-core peak (no sparsity), from the vendors' data sheets, by device-name substring.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def setups(images: int) -> dict[str, dict[str, Any]]:
    """Config overrides of each engine setup (over configs/sd15-paper.yaml)."""
    fast = {
        "sampling": {"sub_batch_size": images},
        "ddpo": {"train_batch_size": 8, "gradient_accumulation_steps": 1},
    }
    return {
        "hero": {**fast, "model": {"dtype": "float16"}},
        "hero-bf16": {**fast, "model": {"dtype": "bfloat16"}},
        "hero-compiled": {**fast, "model": {"dtype": "float16", "compile": True}},
        "reference": {
            "model": {"dtype": "float16"},
            "sampling": {"sub_batch_size": 8},
            "ddpo": {"train_batch_size": 2, "gradient_accumulation_steps": 4},
        },
    }


class PhaseClock:
    """Seconds and peak device memory of wrapped calls, by phase (the device is synchronised around
    each call, so a phase's time is its own). A call inside another (decode inside generate) leaves
    the peak counter alone: resetting it would lose the outer phase's peak so far; the inner phase's
    peak then counts from the outer call's start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = defaultdict(int)
        self.depth = 0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            if self.device.type == "cuda" and self.depth == 0:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.depth += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                self.sync()
                self.seconds[phase] += time.perf_counter() - started
                if self.device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(self.device)
                    self.peak_bytes[phase] = max(self.peak_bytes[phase], peak)

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.peak_bytes.clear()


@contextmanager
def math_attention(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """Attention as explicit matmuls while FLOPs are counted (the counter sees every one); the
    pipeline's own processors (SDPA) are restored after."""
    processors = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        pipe.unet.set_attn_processor(processors)


def unet_flops(pipe: StableDiffusionPipeline, guidance_scale: float, *, backward: bool) -> int:
    """FLOPs of one image's guided UNet call (both CFG branches), with its backward pass when asked
    (activation gradients through the frozen UNet plus the LoRA's weight gradients: DDPO's cost)."""
    unet = pipe.unet
    config = unet.config
    device = unet.device
    sample = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, device=device)
    length = pipe.tokenizer.model_max_length
    states = torch.randn(1, length, pipe.text_encoder.config.hidden_size, device=device, dtype=unet.dtype)
    timestep = torch.tensor([500], device=device)
    grad = torch.set_grad_enabled(backward)
    with math_attention(pipe), FlopCounterMode(display=False) as counter, grad:
        prediction = guided_noise_pred(unet, sample, timestep, states, states, guidance_scale)
        if backward:
            prediction.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def vae_decode_flops(pipe: StableDiffusionPipeline) -> int:
    """FLOPs of decoding one image's latent."""
    config = pipe.unet.config
    latent = torch.randn(
        1, config.in_channels, config.sample_size, config.sample_size, device=pipe.vae.device
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sampler_module.decode_latents(pipe, latent)
    return int(counter.get_total_flops())


def log_prob_mismatch(engine: Engine, batch: RoundBatch, micro_batch: int) -> dict[str, float]:
    """How far DDPO's first look at a round is from the log-probs recorded while sampling, before any
    update: the same policy, recomputed in training's micro-batches (on a GPU the kernels differ with
    the batch). A difference beyond ddpo.clip_range clips a sample that has not been learnt from yet.
    Computed with gradients on, as DDPO computes it: the same kernels, and compiled, the same graph
    (without gradients it would be a third compile, timed nowhere)."""
    trajectory = batch.trajectory
    # DDPO's micro-batch: train_batch_size units, or the whole round when it has fewer; another row
    # count would be a graph of its own under torch.compile (a compile outside every timer)
    micro_batch = images = min(len(trajectory), micro_batch)
    steps_trained = engine.config.ddpo.timesteps_per_trajectory
    rows = torch.arange(images).repeat_interleave(steps_trained)
    steps = torch.linspace(0, trajectory.num_steps - 1, steps_trained).round().long().repeat(images)
    with torch.enable_grad():
        new = torch.cat(
            [
                recompute_log_probs(
                    engine.pipe, trajectory, rows[i : i + micro_batch], steps[i : i + micro_batch]
                ).detach()
                for i in range(0, len(rows), micro_batch)
            ]
        ).cpu()
    difference = (new - trajectory.log_probs[rows, steps]).abs()
    beyond = (difference.exp() - 1) > engine.config.ddpo.clip_range  # |ratio - 1| > clip, to first order
    return {
        "mean_abs": float(difference.mean()),
        "max_abs": float(difference.max()),
        "beyond_clip_range": float(beyond.float().mean()),
        "clip_range": engine.config.ddpo.clip_range,
    }


def synthetic_feedback(batch: RoundBatch, has_best: bool) -> RoundFeedback:
    """Every other image good, the first one best: one annotator, fixed, so every setup learns alike."""
    labels = AnnotatorFeedback(
        annotator="benchmark",
        images=tuple(
            ImageLabel(image_id=image_id, label="good" if i % 2 == 0 else "bad", best=i == 0)
            for i, image_id in enumerate(batch.image_ids)
        ),
    )
    return aggregate([labels], batch.image_ids, has_current_best=has_best)


def base_config(args: argparse.Namespace) -> HeroConfig:
    config = load_config(PAPER_CONFIG)
    return with_overrides(
        config,
        {
            "run_id": "gpu-round",
            "model": {"source": f"random:{args.arch}", "device": args.device, "allow_download": False},
            "sampling": {"images_per_round": args.images, "num_steps": args.steps},
            "ddpo": {"timesteps_per_trajectory": min(config.ddpo.timesteps_per_trajectory, args.steps)},
            "feedback": {"budget": 2 * args.images},
            "storage": {"backend": "local", "local_root": tempfile.mkdtemp(prefix="hero-gpu-round-")},
        },
    )


def run_setup(config: HeroConfig, parallel: DataParallel | None, flop_counts: dict[str, int]) -> dict:
    """Two engine rounds of `config`; round 1 phase by phase. Counts FLOPs into flop_counts once."""
    pipe = load_configured_pipeline(config.model)
    device = pipe.unet.device
    engine = Engine(config, pipe, parallel=parallel)
    if not flop_counts:  # the same model in every setup: count once
        cfg = config.sampling.guidance_scale
        # eager even in a compiled setup: compiling under the FLOP counter, at batch 1, would fill
        # dynamo's cache with graphs the round never uses (and mark the batch dimension dynamic)
        with torch.compiler.set_stance("force_eager"):
            flop_counts["unet_sampling_step"] = unet_flops(pipe, cfg, backward=False)
            flop_counts["unet_training_step"] = unet_flops(pipe, cfg, backward=True)
            flop_counts["vae_decode"] = vae_decode_flops(pipe)
    clock = PhaseClock(device)
    decode = sampler_module.decode_latents
    sampler_module.decode_latents = clock.wrap("decode", decode)
    engine._encoder_round = clock.wrap("encoder", engine._encoder_round)  # type: ignore[method-assign]
    engine._update = clock.wrap("ddpo", engine._update)  # type: ignore[method-assign]
    rounds: list[dict] = []
    said: set[str] = set()

    def milestone(what: str) -> None:
        """Said once in round 0, as it happens (each first step compiles its graph under torch.compile):
        a compile the lease cuts short still says how far it got."""
        if not rounds and what not in said and (parallel is None or parallel.rank == 0):
            said.add(what)
            print(f"  round 0: {what} at {time.perf_counter() - began:.1f} s", flush=True)

    def on_progress(phase: str, done: int, total: int) -> None:
        if phase == "updating the LoRA" and done == 1:
            milestone("first LoRA step done")

    try:
        for index in range(2):
            clock.reset()
            clock.sync()
            began = started = time.perf_counter()
            batch = clock.wrap("generate", engine.generate)(
                on_step=lambda: milestone("first sampling step done")
            )
            if index == 1:  # outside the phase clocks, before the update
                clock.sync()
                paused = time.perf_counter()
                mismatch = log_prob_mismatch(engine, batch, config.ddpo.train_batch_size)
                started += time.perf_counter() - paused
            feedback = synthetic_feedback(batch, has_best=index > 0)
            stats = engine.learn(batch, feedback, on_progress=on_progress)
            clock.sync()
            total = time.perf_counter() - started
            # at once: a lease cut short after the warm-up round keeps at least its (compile) time
            print(f"  round {index}{' (warm-up)' if index == 0 else ''}: {total:.1f} s", flush=True)
            seconds = dict(clock.seconds)
            seconds["sampling"] = seconds.pop("generate") - seconds["decode"]
            rounds.append(
                {
                    "seconds": total,
                    "phases": {p: seconds.get(p, 0.0) for p in PHASES},
                    "peak_gib": {p: clock.peak_bytes.get(p, 0) / 2**30 for p in MEMORY_PHASES},
                    # an fp16 step the loss scale skipped (overflow) learnt nothing: its time is no DDPO's
                    "optimizer_steps": stats.optimizer_steps,
                    "skipped_steps": stats.skipped_steps,
                    "loss_scale": None if engine.loss_scaler is None else engine.loss_scaler.get_scale(),
                }
            )
    finally:
        sampler_module.decode_latents = decode
    del engine, pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"first_round_s": rounds[0]["seconds"], **rounds[1], "log_prob_mismatch": mismatch}


def plain_diffusers(args: argparse.Namespace, config: HeroConfig) -> dict:
    """Plain diffusers generation of the round's images: fp16, batches of 8, warmed up first."""
    dtype = DTYPES["float16"] if args.device != "cpu" else DTYPES["float32"]
    pipe = load_pipeline(f"random:{args.arch}", dtype=dtype, device=args.device)
    device = pipe.unet.device
    sampling = config.sampling
    generators = per_image_generators((sampling.seed, 0), args.images)
    batch = min(8, args.images)

    def generate(count: int) -> None:
        for start in range(0, count, batch):
            part = generators[start : min(start + batch, count)]
            pipe(
                [sampling.prompt] * len(part),
                num_inference_steps=sampling.num_steps,
                guidance_scale=sampling.guidance_scale,
                eta=sampling.eta,
                generator=part,
                output_type="pt",
            )

    clock = PhaseClock(device)
    clock.wrap("warm-up", generate)(batch)
    clock.wrap("generate", generate)(args.images)
    return {"seconds": clock.seconds["generate"], "peak_gib": clock.peak_bytes["generate"] / 2**30}


def memory_sweep(args: argparse.Namespace, config: HeroConfig, sub_batch: int) -> list[dict]:
    """Peak memory of sampling `images` a round at a fixed sub-batch: it must not grow with images."""
    points = []
    for images in (sub_batch, 2 * sub_batch, 4 * sub_batch):
        sweep = with_overrides(
            config,
            {
                **setups(images)["hero"],
                "sampling": {"images_per_round": images, "sub_batch_size": sub_batch},
            },
        )
        pipe = load_configured_pipeline(sweep.model)
        clock = PhaseClock(pipe.unet.device)
        clock.wrap("generate", sample_batch)(pipe, sweep.sampling, 0)
        points.append(
            {
                "images": images,
                "sub_batch": sub_batch,
                "seconds": clock.seconds["generate"],
                "peak_gib": clock.peak_bytes["generate"] / 2**30,
            }
        )
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    return points


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops is not None:
        return float(args.peak_tflops)
    if not torch.cuda.is_available() or args.device == "cpu":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def figures_of(
    name: str, result: dict, config: HeroConfig, flops: dict[str, int], peak: float | None, world: int
) -> dict:
    """Derived figures of one setup: images/s per phase, achieved TFLOP/s and the share of the peak."""
    images = config.sampling.images_per_round
    work = round_work(config, flops)
    phases = result["phases"]
    out: dict[str, Any] = {
        "setup": name,
        "dtype": config.model.dtype,  # what the setup ran in (a CPU runs every setup in float32)
        "compiled": config.model.compile,
        "first_round_s": round(result["first_round_s"], 2),
        "round_s": round(result["seconds"], 2),
        "phases_s": {p: round(s, 3) for p, s in phases.items()},
        "peak_memory_gib": {p: round(g, 2) for p, g in result["peak_gib"].items()},
        "images_per_s": {p: round(images / phases[p], 2) for p in ("sampling", "decode") if phases[p] > 0},
        "log_prob_mismatch": result["log_prob_mismatch"],
        "optimizer_steps": result["optimizer_steps"],
        "skipped_steps": result["skipped_steps"],
        "loss_scale": result["loss_scale"],
        "tflops_achieved": {},
        "share_of_bf16_peak": {},
    }
    for phase, flop in work.items():
        if phases[phase] > 0:
            achieved = flop / phases[phase] / 1e12
            out["tflops_achieved"][phase] = float(f"{achieved:.4g}")
            if peak is not None:
                out["share_of_bf16_peak"][phase] = round(achieved / (peak * world), 3)
    if peak is not None:
        bound = work["sampling"] / (peak * world * 1e12)
        out["sampling_lower_bound_s"] = round(bound, 3)
        out["sampling_over_lower_bound"] = round(phases["sampling"] / bound, 2)
    return out


def round_work(config: HeroConfig, flops: dict[str, int]) -> dict[str, int]:
    """FLOPs of a round's phases: sampling (every guided step), decode, DDPO (every trained step)."""
    images, ddpo = config.sampling.images_per_round, config.ddpo
    trained = images * ddpo.timesteps_per_trajectory * ddpo.inner_epochs
    return {
        "sampling": images * config.sampling.num_steps * flops["unet_sampling_step"],
        "decode": images * flops["vae_decode"],
        "ddpo": trained * flops["unet_training_step"],
    }


def flops_only(args: argparse.Namespace) -> None:
    """The model's FLOP counts and a round's compute lower bound at a given peak, without timing."""
    config = base_config(args)
    if args.device == "cpu":  # the count does not depend on the dtype; float32 is what a CPU runs fast
        config = with_overrides(config, {"model": {"dtype": "float32"}})
    pipe = load_configured_pipeline(config.model)
    Engine(config, pipe)  # the LoRA is part of the counted model
    cfg = config.sampling.guidance_scale
    flops = {
        "unet_sampling_step": unet_flops(pipe, cfg, backward=False),
        "unet_training_step": unet_flops(pipe, cfg, backward=True),
        "vae_decode": vae_decode_flops(pipe),
    }
    peak = args.peak_tflops or BF16_PEAK_TFLOPS["H200"]
    work = round_work(config, flops)
    bounds = {phase: flop / (peak * 1e12) for phase, flop in work.items()}
    lines = [
        f"### FLOPs of a HERO round on {args.arch} ({args.images} images, {args.steps} DDIM steps, "
        "CFG, configs/sd15-paper.yaml's DDPO)",
        "",
        "Counted from the model by torch.utils.flop_counter (math attention, LoRA attached); a lower "
        f"bound is FLOPs / {peak:.0f} TFLOP/s (bf16 dense peak of one H200 unless --peak-tflops).",
        "",
        "| unit | GFLOP | phase | TFLOP a round | lower bound s |",
        "|---|---|---|---|---|",
        f"| guided UNet step (2 rows) | {flops['unet_sampling_step'] / 1e9:.1f} | sampling "
        f"| {work['sampling'] / 1e12:.1f} | {bounds['sampling']:.2f} |",
        f"| VAE decode (1 image) | {flops['vae_decode'] / 1e9:.1f} | decode "
        f"| {work['decode'] / 1e12:.1f} | {bounds['decode']:.2f} |",
        f"| trained UNet step (fwd + bwd) | {flops['unet_training_step'] / 1e9:.1f} | DDPO "
        f"| {work['ddpo'] / 1e12:.1f} | {bounds['ddpo']:.2f} |",
        f"| | | **round** | **{sum(work.values()) / 1e12:.1f}** | **{sum(bounds.values()):.2f}** |",
    ]
    write_result(
        args.name,
        {
            "arch": args.arch,
            "images": args.images,
            "steps": args.steps,
            "peak_tflops": peak,
            "flops": flops,
            "round_tflop": {p: w / 1e12 for p, w in work.items()},
            "lower_bound_s": bounds,
        },
        "\n".join(lines),
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument(
        "--device", default="cuda", help="cuda, cuda:1, cpu (under torchrun: each rank's GPU)"
    )
    parser.add_argument("--images", type=int, default=64, help="images a round (the paper: 64)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the paper: 50)")
    parser.add_argument(
        "--setups",
        default="hero,hero-bf16,hero-compiled,reference,diffusers",
        help="comma-separated, in run order",
    )
    parser.add_argument(
        "--memory-sweep", action="store_true", help="peak memory vs images at a fixed sub-batch"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 dense peak")
    parser.add_argument("--name", default="gpu_round", help="result name: results/<name>.json")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="count the model's FLOPs (any device) and write the round's lower bounds at --peak-tflops",
    )
    args = parser.parse_args()
    if args.flops_only:
        flops_only(args)
        return

    parallel = DataParallel.launched() if torch.distributed.is_torchelastic_launched() else None
    world = parallel.world if parallel else 1
    if parallel is not None and args.device.startswith("cuda"):
        args.device = str(parallel.device)
    config = base_config(args)
    chosen = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = set(chosen) - {*setups(args.images), "diffusers"}
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}: choose from {[*setups(args.images), 'diffusers']}")
    peak = peak_tflops(args)
    flops: dict[str, int] = {}
    results: list[dict] = []
    failed: list[dict] = []
    plain: dict | None = None
    sweep: list[dict] | None = None

    def report() -> None:  # after every setup: a later one failing or timing out loses nothing before it
        if parallel is None or parallel.rank == 0:
            write_report(args, config, world, peak, flops, results, plain, sweep, failed)

    for name in chosen:
        try:
            if name == "diffusers":
                if parallel is None:
                    plain = plain_diffusers(args, config)
                    print(f"diffusers: {plain['seconds']:.2f} s for {args.images} images", flush=True)
            else:
                setup_config = with_overrides(config, setups(args.images)[name])
                if args.device == "cpu":  # no fp16/bf16 tensor cores: on a CPU every setup runs float32
                    setup_config = with_overrides(setup_config, {"model": {"dtype": "float32"}})
                result = run_setup(setup_config, parallel, flops)
                results.append(figures_of(name, result, setup_config, flops, peak, world))
                if parallel is None or parallel.rank == 0:
                    print(f"{name}: {results[-1]}", flush=True)
        except Exception as err:
            if parallel is not None:  # the other ranks wait in a collective: no carrying on alone
                raise
            traceback.print_exc()
            failed.append({"setup": name, "error": f"{type(err).__name__}: {err}"[:500]})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report()
    if args.memory_sweep and args.device != "cpu":
        try:
            sweep = memory_sweep(args, config, sub_batch=8)
        except Exception as err:
            traceback.print_exc()
            failed.append({"setup": "memory sweep", "error": f"{type(err).__name__}: {err}"[:500]})
        report()
    if parallel is not None:
        parallel.close()
    if failed:
        sys.exit(f"failed: {', '.join(f['setup'] for f in failed)} (the others' figures are written)")


def write_report(
    args: argparse.Namespace,
    config: HeroConfig,
    world: int,
    peak: float | None,
    flops: dict[str, int],
    results: list[dict],
    plain: dict | None,
    sweep: list[dict] | None,
    failed: list[dict],
) -> None:
    """results/<name>.json and its table in RESULTS.md, from the setups done so far."""
    counted = (
        f"FLOPs counted from the model: UNet {flops['unet_sampling_step'] / 1e9:.4g} GFLOP a guided "
        f"sampling step, {flops['unet_training_step'] / 1e9:.4g} GFLOP a trained step (forward + "
        f"backward), VAE decode {flops['vae_decode'] / 1e9:.4g} GFLOP an image."
        if flops
        else "FLOPs not counted (no engine setup finished)."
    )
    lines = [
        f"### One HERO round on {args.arch} ({args.images} images, {args.steps} DDIM steps, CFG "
        f"{config.sampling.guidance_scale}, eta {config.sampling.eta}; {world} process(es))",
        "",
        "Round 1 (the steady state) phase by phase; `first round` includes warm-up and compilation. "
        f"{counted} bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown (CPU)'}.",
        "",
        "| setup | round s | first round s | sampling s | decode s | encoder s | DDPO s | sampling img/s "
        "| sampling TFLOP/s | share of peak | DDPO TFLOP/s | peak GiB (sample / DDPO) |",
        "|---|" + "---|" * 11,
    ]
    for r in results:
        phases, achieved, share = r["phases_s"], r["tflops_achieved"], r["share_of_bf16_peak"]
        lines.append(
            f"| {r['setup']} | {r['round_s']} | {r['first_round_s']} | {phases['sampling']} "
            f"| {phases['decode']} "
            f"| {phases['encoder']} | {phases['ddpo']} | {r['images_per_s'].get('sampling', '—')} "
            f"| {achieved.get('sampling', '—')} | {share.get('sampling', '—')} | {achieved.get('ddpo', '—')} "
            f"| {r['peak_memory_gib']['generate']} / {r['peak_memory_gib']['ddpo']} |"
        )
    if plain is not None:
        lines.append(
            f"| diffusers (generation only) | — | — | {plain['seconds']:.2f} | incl. | — | — "
            f"| {args.images / plain['seconds']:.2f} | — | — | — | {plain['peak_gib']:.2f} / — |"
        )
    ratios = []
    by_name = {r["setup"]: r for r in results}
    if "hero" in by_name and "reference" in by_name:
        speedup = by_name["reference"]["round_s"] / by_name["hero"]["round_s"]
        ratios.append(f"reference / hero round time: {speedup:.2f}x")
    if "hero" in by_name and plain is not None:
        hero_generate = by_name["hero"]["phases_s"]["sampling"] + by_name["hero"]["phases_s"]["decode"]
        ratios.append(f"hero sampling + decode / plain diffusers: {hero_generate / plain['seconds']:.2f}x")
    for r in results:
        if "sampling_over_lower_bound" in r:
            ratios.append(f"{r['setup']} sampling / FLOP lower bound: {r['sampling_over_lower_bound']}x")
    if ratios:
        lines += ["", "; ".join(ratios) + "."]
    if results:
        lines += [
            "",
            "Recorded vs recomputed log-probs before any update (DDPO's first look at the round, in its "
            "micro-batches; mean |difference|, and the share beyond ddpo.clip_range): "
            + "; ".join(
                f"{r['setup']} {m['mean_abs']:.2g}, {m['beyond_clip_range']:.0%} beyond {m['clip_range']:g}"
                for r in results
                for m in [r["log_prob_mismatch"]]
            )
            + ". Optimiser steps taken / skipped by the loss scale (round 1): "
            + "; ".join(f"{r['setup']} {r['optimizer_steps']} / {r['skipped_steps']}" for r in results)
            + ".",
        ]
    if sweep:
        lines += ["", "Peak memory of sampling at a fixed sub-batch of 8 (hero setup): "]
        lines += [f"{p['images']} images: {p['peak_gib']:.2f} GiB ({p['seconds']:.1f} s)" for p in sweep]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{f['setup']}: {f['error']}" for f in failed) + "."]
    write_result(
        args.name,
        {
            "arch": args.arch,
            "images": args.images,
            "steps": args.steps,
            "world_size": world,
            "bf16_peak_tflops": peak,
            "flops": flops,
            "setups": results,
            "diffusers": plain,
            "memory_sweep": sweep,
            "failed": failed,
        },
        "\n".join(lines),
    )
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
