"""HERO judged from its own feedback-guided noises, beside the plain-noise evaluation.

feedback_efficiency.py evaluates every policy from fixed plain N(0, I) noises, as a user who samples
the LoRA does. HERO trains from feedback-guided noises (near the best and good images' x_T), and the
paper's authors appear to have sampled their evaluation images from that distribution too (FINDINGS.md,
"Sampled from its own guided noises"). For each HERO run of the grid that has learned `--at`
feedbacks, this samples `--eval-images` images from the run's guided distribution at that checkpoint
(its best and good noises, the config's best ratio and eps), once with the LoRA and once with the
base model (adapters off, the same noises), and sets them beside the grid's plain-noise rates of the
two: what the noises select, what the LoRA learned, and both together.

    python benchmarks/guided_evaluation.py      # after feedback_efficiency.py, beside its work folder

Runs already in results/guided_evaluation.json at the same --at and --eval-images, measured on the
checkpoint that is there now (its sha256), are kept, not sampled again: call it again as the grid's
runs pass --at. A run trained again since is measured anew.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from feedback_efficiency import (
    CSV_PATH,
    METHODS,
    WORK,
    curves,
    feedbacks_to_reach,
    measured_by_every_seed,
    read_points,
    spread,
)
from results_io import RESULTS_DIR, write_result

from hero_ml.adapters.storage import LocalStore
from hero_ml.config import HeroConfig, restore_config
from hero_ml.diffusion.lora import adapters_disabled
from hero_ml.diffusion.pipeline import load_configured_pipeline
from hero_ml.engine import STATE, Engine
from hero_ml.run_store import RunStore
from hero_ml.toy.evaluate import task_success_rate
from hero_ml.toy.task import load_task

NAME = "guided_evaluation"
KINDS = ("base_plain", "base_guided", "lora_plain", "lora_guided")


def checkpoint_at(store: LocalStore, run_id: str, at: int) -> tuple[HeroConfig, int, str] | None:
    """Run `run_id`'s config, the index of its checkpoint after `at` feedbacks and that checkpoint's
    tensors' sha256 (what the figures of a run were taken from); None while it has not learned them."""
    runs = RunStore(store, run_id)
    stored = runs.load_config()
    latest = runs.latest_checkpoint()
    if stored is None or latest is None:
        return None
    config = restore_config(stored, HeroConfig())
    learned = at // config.feedbacks_per_round - 1  # the checkpoint after the round that spent `at`
    if at % config.feedbacks_per_round or learned > latest:
        return None
    state = json.loads(store.get(f"{runs.checkpoint_prefix(learned)}/{STATE}"))
    return config, learned, state["tensors"]["sha256"]


def guided_rates(
    store: LocalStore, run_id: str, checkpoint: tuple[HeroConfig, int, str], at: int, n: int, *, seed: int = 0
) -> dict:
    """The success rates of run `run_id`'s LoRA after `at` feedbacks and of its base model, both on
    n images from the run's guided noise distribution there; checkpoint: checkpoint_at's answer.

    The guided noises come from a generator seeded `seed`; the denoising steps draw from each image's
    generator (seed, i), as in the plain-noise evaluation."""
    config, learned, digest = checkpoint
    runs = RunStore(store, run_id)
    pipe = load_configured_pipeline(config.model)
    engine = Engine.load(config, pipe, store, runs.checkpoint_prefix(learned))
    pool = engine.noise_pool()
    if engine.feedbacks != at or pool is None:
        raise SystemExit(f"{run_id}: checkpoint {learned} holds {engine.feedbacks} feedbacks, expected {at}")
    noise = pool.sample(n, torch.Generator().manual_seed(seed))
    task = load_task(config.simulation.task)

    def rate() -> float:
        return task_success_rate(pipe, task, n, config.sampling, seed=seed, initial_noise=noise)

    lora = rate()
    with adapters_disabled(pipe.unet):
        base = rate()
    return {
        "lora_guided": lora,
        "base_guided": base,
        "checkpoint": learned,
        "checkpoint_sha256": digest,
        "pool": len(pool.good) + 1,
    }


def summary(runs: dict[str, dict]) -> dict[str, dict]:
    """task -> per kind of rate, the mean and sample std over the task's seeds (None for one seed)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for key, figures in runs.items():
        by_task[key.split("/")[0]].append(figures)
    return {
        task: {"seeds": len(rows)}
        | {kind: float(np.mean([r[kind] for r in rows])) for kind in KINDS}
        | {f"{kind}_std": spread([r[kind] for r in rows]) for kind in KINDS}
        for task, rows in sorted(by_task.items())
    }


def baselines_to_reach(
    points: list[dict], targets: dict[str, float]
) -> dict[str, dict[str, int | None] | None]:
    """task -> baseline -> the feedbacks its seeds' mean plain-noise curve first reaches the task's
    target (None: not within its points): the paper's "Nx" figure with HERO judged from its pool.
    A task whose target is not above its base maps to None: every curve starts there, no figure."""
    table = curves(points)
    base = {p["task"]: p["success_rate"] for p in points if p["round"] == 0}
    return {
        task: None
        if task in base and target <= base[task]
        else {
            m: feedbacks_to_reach(table[(task, m)], target)
            for m in METHODS[1:]
            if max(table.get((task, m), {0: []})) > 0  # a run with a learned round, not the base alone
        }
        for task, target in targets.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help="The feedback-efficiency points.")
    parser.add_argument(
        "--work", type=Path, default=WORK / "default", help="That grid's work folder (--work/--tag)."
    )
    parser.add_argument(
        "--at", type=int, default=512, help="Evaluate the checkpoints at this many feedbacks."
    )
    parser.add_argument("--eval-images", type=int, default=256, help="Images from each guided distribution.")
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS_DIR / f"{NAME}.json",
        help="Where the figures go and are kept.",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="Rebuild the table from the runs kept in --results and today's CSV, sampling nothing (a "
        "new machine's checkout has no work folder).",
    )
    args = parser.parse_args()
    kept = json.loads(args.results.read_text()) if args.results.exists() else {}
    points = read_points(args.csv)
    if args.report:
        if not kept.get("runs"):
            parser.error(f"--report: no runs kept in {args.results} yet; measure them first")
        args.at, args.eval_images = kept["at_feedbacks"], kept["eval_images"]
        report(args, kept["runs"], points)
        return
    if not args.work.is_dir():
        parser.error(
            f"--work {args.work} is not a folder: run feedback_efficiency.py first or name its work folder"
        )
    measured = (
        kept.get("runs", {})
        if (kept.get("at_feedbacks"), kept.get("eval_images")) == (args.at, args.eval_images)
        else {}
    )
    runs: dict[str, dict] = {}  # the runs of the grid as it is now: a kept figure must be of its checkpoint
    base_plain = {p["task"]: p["success_rate"] for p in points if p["round"] == 0}
    store = LocalStore(args.work)
    for p in points:
        key, run_id = f"{p['task']}/{p['seed']}", f"{p['task']}-hero-{p['seed']}"
        if p["method"] != "hero" or p["feedbacks"] != args.at:
            continue
        now = checkpoint_at(store, run_id, args.at)
        if now is None:  # not learned that far (or not in this work folder)
            continue
        if key in measured and measured[key].get("checkpoint_sha256") == now[2]:
            runs[key] = measured[key]  # measured on this very checkpoint (a run trained again is not)
            continue
        guided = guided_rates(store, run_id, now, args.at, args.eval_images)
        runs[key] = {"base_plain": base_plain[p["task"]], "lora_plain": p["success_rate"], **guided}
        print(f"{key}: " + ", ".join(f"{kind} {runs[key][kind]:.3f}" for kind in KINDS), flush=True)
    if not runs:
        raise SystemExit(
            f"no HERO run in {args.work} has learned and been measured at {args.at} feedbacks yet"
        )
    report(args, runs, points)


def report(args: argparse.Namespace, runs: dict[str, dict], points: list[dict]) -> None:
    """The table of the measured runs, each baseline set against their guided rate on today's curves."""
    table = summary(runs)
    reach = baselines_to_reach(points, {task: cell["lora_guided"] for task, cell in table.items()})
    table_of_curves = curves(points)
    rows = [
        "| task | seeds | base, plain noise | base, guided noise | LoRA, plain noise (the grid's) "
        "| LoRA, guided noise | feedbacks a baseline needs to reach it (plain noise) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, cell in table.items():
        cell["baselines_to_reach"] = needed = reach[task]
        rates = " | ".join(
            f"{cell[kind]:.3f}" + ("" if (std := cell[f"{kind}_std"]) is None else f" ± {std:.3f}")
            for kind in KINDS
        )
        needs = (
            "— (not above the base)"
            if needed is None
            else "; ".join(
                f"{method} {n} ({n / args.at:g}x)"
                if n is not None
                else f"{method} > {max(measured_by_every_seed(table_of_curves[(task, method)]))}"
                for method, n in needed.items()
            )
        )
        rows.append(f"| {task} | {cell['seeds']} | {rates} | {needs or '—'} |")
    markdown = "\n".join(
        [
            f"### HERO from its own guided noises (after {args.at} feedbacks)",
            "",
            f"Per HERO run, {args.eval_images} images from the run's feedback-guided noise distribution",
            f"after {args.at} feedbacks (its best and good images' x_T, perturbed as in training), sampled",
            "with the LoRA and with the base model (adapters off, the same noises), beside the grid's",
            "plain-noise rates; mean ± sample std over seeds. Base, guided: what the choice of noises alone",
            "buys. The last column is the paper's comparison if its HERO figures were taken from the pool:",
            "where each baseline's mean curve (plain noise: baselines have no pool; as far as every seed",
            "has reached) first reaches HERO's guided rate.",
            "",
            *rows,
        ]
    )
    figures = {"at_feedbacks": args.at, "eval_images": args.eval_images, "cells": table, "runs": runs}
    if args.results == RESULTS_DIR / f"{NAME}.json":
        write_result(NAME, figures, markdown)
    else:
        args.results.write_text(json.dumps(figures, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
