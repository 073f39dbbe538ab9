"""Hyper-parameter probe: one training run with config overrides, judged once at the end.

The feedback-efficiency grid measures after every round; tuning needs many cheaper runs. This trains
one (task, method) for a budget with the given overrides, then measures the success rate on the same
fixed evaluation set the grid uses (plain N(0, I) noises, seed 0), and appends one row with every
per-round learning figure (rewards of good and bad, DDPO approx-KL and clip fraction, encoder loss, and
the reward's AUC of good vs bad on the round before and after the encoder learned it) to
benchmarks/results/hyperparameter_probe.csv. The table in RESULTS.md is written from that file.

    python benchmarks/hyperparameter_probe.py --task counting --method hero \
        --set '{"ddpo": {"lr": 0.003, "inner_epochs": 4}}' --budget 256
    python benchmarks/hyperparameter_probe.py --report
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from results_io import RESULTS_DIR, write_result
from scipy.stats import mannwhitneyu

from hero_ml.adapters.storage import LocalStore
from hero_ml.config import load_config, with_overrides
from hero_ml.toy.evaluate import task_success_rate
from hero_ml.toy.task import load_task
from hero_ml.training import TrainingRun

CSV_PATH = RESULTS_DIR / "hyperparameter_probe.csv"
COLUMNS = (
    "task",
    "method",
    "config",
    "overrides",
    "budget",
    "seed",
    "base",
    "success_rate",
    "seconds",
    "rounds",
)


def reward_auc(rewards: list[float] | None, good: tuple[bool, ...]) -> float | None:
    """How well the encoder's reward ranks the round's good images above its bad ones: the share of
    (good, bad) pairs it orders right (ties count half; Mann-Whitney U / n_good n_bad). None: no
    encoder or best yet, or a round without good or without bad images."""
    if rewards is None or all(good) or not any(good):
        return None
    positive = [r for r, g in zip(rewards, good, strict=True) if g]
    negative = [r for r, g in zip(rewards, good, strict=True) if not g]
    result = mannwhitneyu(positive, negative, alternative="greater")
    return round(float(result.statistic) / (len(positive) * len(negative)), 4)


def probe(args: argparse.Namespace) -> dict:
    spec = load_task(args.task)
    config = with_overrides(
        load_config(args.config),
        {
            "run_id": "probe",
            "method": args.method,
            "sampling": {"prompt": spec.prompts[0], "seed": args.seed},
            "feedback": {"budget": args.budget},
            "simulation": {"task": args.task, "eval_images": 0},
        },
    )
    config = with_overrides(config, json.loads(args.set))
    work = Path(tempfile.mkdtemp(prefix="hero-probe-"))
    try:
        with TrainingRun(config, LocalStore(work)) as run:
            started = time.perf_counter()
            rounds = []
            while not run.done:
                batch = run.generate()
                feedback = run.feedback(batch)
                fresh = reward_auc(run.engine.predicted_rewards(batch), feedback.good)  # before learning it
                stats = run.learn(batch, feedback)
                trained = reward_auc(run.engine.predicted_rewards(batch), feedback.good)
                rounds.append({**stats.metrics(), "reward_auc_fresh": fresh, "reward_auc_trained": trained})
                print(
                    f"round {stats.round}: {stats.good} good, reward good {stats.reward_good_mean} "
                    f"bad {stats.reward_bad_mean}, AUC fresh {fresh} trained {trained}, "
                    f"kl {stats.approx_kl}, clip {stats.clip_fraction}",
                    flush=True,
                )
            rate = task_success_rate(run.pipe, spec, args.eval_images, config.sampling, seed=0)
    finally:
        shutil.rmtree(work)
    return {
        "task": args.task,
        "method": args.method,
        "config": str(args.config or "defaults"),
        "overrides": args.set,
        "budget": args.budget,
        "seed": args.seed,
        "base": args.base,
        "success_rate": rate,
        "seconds": round(time.perf_counter() - started, 1),
        "rounds": json.dumps(rounds),
    }


def report() -> None:
    with CSV_PATH.open() as handle:
        rows = list(csv.DictReader(handle))
    lines = [
        "### Hyper-parameter probes (toy world)",
        "",
        "One run each, judged once at the end on the fixed evaluation set; `base` is the model before",
        "training on the same set. Every round's figures: `results/hyperparameter_probe.csv`. A row",
        "reruns as `python benchmarks/hyperparameter_probe.py --config benchmarks/configs/<config>",
        "--task <task> --method <method> --set '<overrides>' --budget <feedbacks> --seed <seed>`.",
        "",
        "| task | method | config | overrides | feedbacks | seed | base | success rate | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['task']} | {r['method']} | {Path(r['config']).name} | `{r['overrides']}` | {r['budget']} | "
        f"{r['seed']} | {r['base']} | **{float(r['success_rate']):.3f}** | {r['seconds']} |"
        for r in rows
    ]
    write_result("hyperparameter_probe", {"probes": rows}, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="counting", help="Toy task (a shipped name).")
    parser.add_argument("--method", default="hero", choices=("hero", "hero-noguide", "ddpo-binary", "d3po"))
    parser.add_argument("--config", type=Path, help="HERO config file the overrides apply to.")
    parser.add_argument(
        "--set", default="{}", help='Config overrides as JSON, e.g. \'{"ddpo": {"lr": 0.003}}\'.'
    )
    parser.add_argument("--budget", type=int, default=256, help="Feedbacks to spend.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed of the run.")
    parser.add_argument("--eval-images", type=int, default=256, help="Images of the evaluation set.")
    parser.add_argument("--base", default="", help="The base rate to print beside (from the grid's round 0).")
    parser.add_argument("--report", action="store_true", help="Only rewrite the table from the CSV.")
    args = parser.parse_args()
    if not args.report:
        row = probe(args)
        new = not CSV_PATH.exists()
        CSV_PATH.parent.mkdir(parents=True, exist_ok=True)
        with CSV_PATH.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"success rate {row['success_rate']:.3f} after {args.budget} feedbacks ({row['seconds']} s)")
    report()


if __name__ == "__main__":
    main()
