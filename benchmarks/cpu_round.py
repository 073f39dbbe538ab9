"""The CPU round budget: one round of the main job (`hero run` on embedded defaults), phase by phase.

Runs the default config (the toy model, 64 images a round, the simulated annotators, local storage)
for `--rounds` rounds and times every phase of each: sampling (the denoising loop), VAE decoding,
committing the batch, the simulated annotators, the encoder's triplet training, the DDPO update and the
checkpoint; then the evaluation the main job runs before and after training. The steady state is the
last round (round 0 has no best yet, so no encoder reward and no guidance). Phases are timed by
wrapping the functions that do them; nothing else changes.

    python benchmarks/cpu_round.py            # -> results/cpu_round.json and its RESULTS.md table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import write_result

import hero_ml.diffusion.sampler as sampler_module
from hero_ml.adapters.storage import LocalStore
from hero_ml.config import load_config, with_overrides
from hero_ml.toy.evaluate import task_success_rate
from hero_ml.training import TrainingRun

PHASES = ("sampling", "decode", "commit", "annotators", "encoder", "ddpo", "checkpoint")


class Clock:
    """Seconds spent in wrapped functions, by phase, for the current round."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="Rounds to run; the last is reported.")
    parser.add_argument(
        "--eval-images", type=int, default=None, help="Evaluation images (default: the config's)."
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hero-cpu-round-"))
    config = load_config()
    main_job_rounds = config.rounds  # of the default budget, before this run's shorter one
    config = with_overrides(
        config,
        {
            "run_id": "cpu-round",
            "feedback": {"budget": args.rounds * config.feedbacks_per_round},
            "storage": {"backend": "local", "local_root": str(work)},
        },
    )
    eval_images = args.eval_images if args.eval_images is not None else config.simulation.eval_images
    clock = Clock()
    run = TrainingRun(config, LocalStore(work))
    sampler_module.decode_latents = clock.wrap("decode", sampler_module.decode_latents)
    run.runs.commit_batch = clock.wrap("commit", run.runs.commit_batch)  # type: ignore[method-assign]
    run.runs.save_checkpoint = clock.wrap("checkpoint", run.runs.save_checkpoint)  # type: ignore[method-assign]
    run.engine._encoder_round = clock.wrap("encoder", run.engine._encoder_round)  # type: ignore[method-assign]
    run.engine._update = clock.wrap("ddpo", run.engine._update)  # type: ignore[method-assign]

    rounds = []
    while not run.done:
        clock.seconds.clear()
        started = time.perf_counter()
        batch = run.generate()
        generated = time.perf_counter()
        feedback = clock.wrap("annotators", run.feedback)(batch)
        run.learn(batch, feedback)
        total = time.perf_counter() - started
        # generate() = the denoising loop + decode + commit: sampling is what is left of it
        clock.seconds["sampling"] = generated - started - clock.seconds["decode"] - clock.seconds["commit"]
        phases = {phase: round(clock.seconds[phase], 2) for phase in PHASES}
        rounds.append({"round": batch.round, "seconds": round(total, 2), "phases": phases})
        print(f"round {batch.round}: {total:.1f} s {phases}", flush=True)
    run.close()  # its lease: the evaluation below writes nothing

    started = time.perf_counter()
    task_success_rate(run.pipe, run.task, eval_images, config.sampling, seed=0)  # what evaluate() runs
    evaluation = time.perf_counter() - started

    steady = rounds[-1]
    sampled = config.sampling.images_per_round
    figures = {
        "config": {
            "images_per_round": sampled,
            "num_steps": config.sampling.num_steps,
            "sub_batch_size": config.sampling.sub_batch_size,
            "ddpo_inner_epochs": config.ddpo.inner_epochs,
            "ddpo_timesteps_per_trajectory": config.ddpo.timesteps_per_trajectory,
            "encoder_epochs_per_round": config.encoder.epochs_per_round,
            "rounds_of_the_main_job": main_job_rounds,
            "eval_images": eval_images,
        },
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "evaluation_seconds": round(evaluation, 2),
        "sampling_images_per_s": round(sampled / steady["phases"]["sampling"], 2),
        "main_job_minutes_estimate": round(
            (main_job_rounds * steady["seconds"] + 2 * evaluation) / 60, 1
        ),  # rounds + the evaluations before and after
    }
    lines = [
        "### CPU round budget (toy model, default config)",
        "",
        f"One round of the main job: {sampled} images, {config.sampling.num_steps} DDIM steps with CFG, "
        f"{config.ddpo.inner_epochs} DDPO passes over {config.ddpo.timesteps_per_trajectory} timesteps "
        f"a trajectory, {config.encoder.epochs_per_round} encoder epochs; {torch.get_num_threads()} "
        "torch threads. The steady state is the last round (round 0 has no encoder reward yet).",
        "",
        "| phase | " + " | ".join(f"round {r['round']} (s)" for r in rounds) + " | share of the last |",
        "|---|" + "---|" * (len(rounds) + 1),
    ]
    for phase in PHASES:
        share = steady["phases"][phase] / steady["seconds"]
        lines.append(
            f"| {phase} | " + " | ".join(f"{r['phases'][phase]:.2f}" for r in rounds) + f" | {share:.0%} |"
        )
    lines.append("| **whole round** | " + " | ".join(f"**{r['seconds']:.1f}**" for r in rounds) + " | 100% |")
    lines += [
        "",
        f"Sampling: {figures['sampling_images_per_s']} images/s. Evaluation of {eval_images} images: "
        f"{evaluation:.1f} s (the main job runs it before and after). The main job "
        f"({main_job_rounds} rounds + 2 evaluations) takes about **{figures['main_job_minutes_estimate']} "
        "minutes** here.",
    ]
    write_result("cpu_round", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
