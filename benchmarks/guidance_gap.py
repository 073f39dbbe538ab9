"""Guided training batches against the plain-noise evaluation: what annotators see, what the LoRA does.

HERO samples each round's training batch from feedback-guided noise (near the best and good images'
x_T); the feedback-efficiency benchmark evaluates every round on plain N(0, I) noise. For each run of
that benchmark (its work folder), this pairs, round by round, the share of good images in the training
batch (the simulated annotator's labels, the round's stats.json) with the evaluation success rate of
the same policy: the batch of round r and the CSV's point of round r are both sampled after r updates.
Without guidance the two estimate one rate; with it, the gap says how much better the policy does
near the guided noises than from plain noise, where a user of the LoRA samples.

    python benchmarks/guidance_gap.py      # after feedback_efficiency.py, beside its work folder

Runs paired before (results/guidance_gap.json, at the same --at) are kept: a work folder lives on the
machine that ran the grid, and the grid is spread over machines. A run in the work folder is paired
anew (a run trained again replaces its kept pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from feedback_efficiency import CSV_PATH, METHODS, WORK, read_points, spread
from results_io import RESULTS_DIR, write_result

from hero_ml.adapters.storage import LocalStore
from hero_ml.run_store import RunStore


def paired_rounds(points: list[dict], store: LocalStore, at: int) -> dict[tuple[str, str, int], list[dict]]:
    """(task, method, seed) -> per round from 1 up to `at` feedbacks: {round, batch_good, evaluation},
    for the runs measured at `at` (a run still short of it is left out, not half-counted)."""
    by_run: dict[tuple[str, str, int], dict[int, dict]] = defaultdict(dict)
    for p in points:
        if p["feedbacks"] <= at:
            by_run[(p["task"], p["method"], p["seed"])][p["round"]] = p
    pairs = {}
    for (task, method, seed), measured in sorted(by_run.items()):
        run = RunStore(store, f"{task}-{method}-{seed}")
        latest = run.latest_checkpoint()
        wanted = sorted(r for r in measured if r >= 1)
        if not any(measured[r]["feedbacks"] == at for r in wanted) or latest is None or latest < wanted[-1]:
            continue
        rows = []
        for r in wanted:
            stats = run.load_stats(r)
            rows.append(
                {
                    "round": r,
                    "batch_good": stats.good / (stats.good + stats.bad),
                    "evaluation": measured[r]["success_rate"],
                }
            )
        pairs[(task, method, seed)] = rows
    return pairs


def summary(pairs: dict[tuple[str, str, int], list[dict]]) -> dict[tuple[str, str], dict]:
    """(task, method) -> means over rounds, then the mean over seeds of both rates and of the gap,
    and the gap's sample std over seeds (None for one seed)."""
    by_cell: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (task, method, _), rows in pairs.items():
        by_cell[(task, method)].append(
            (float(np.mean([r["batch_good"] for r in rows])), float(np.mean([r["evaluation"] for r in rows])))
        )
    table = {}
    for cell, seeds in by_cell.items():
        batch, evaluation = np.array(seeds).T
        table[cell] = {
            "seeds": len(seeds),
            "batch_good": float(batch.mean()),
            "evaluation": float(evaluation.mean()),
            "gap": float((batch - evaluation).mean()),
            "gap_std": spread(list(batch - evaluation)),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help="The feedback-efficiency points.")
    parser.add_argument(
        "--work", type=Path, default=WORK / "default", help="That grid's work folder (--work/--tag)."
    )
    parser.add_argument("--at", type=int, default=512, help="Pair the rounds up to this many feedbacks.")
    parser.add_argument(
        "--results", type=Path, default=RESULTS_DIR / "guidance_gap.json", help="Where pairs are kept."
    )
    args = parser.parse_args()
    kept = json.loads(args.results.read_text()) if args.results.exists() else {}
    pairs = {
        (task, method, int(seed)): rows
        for key, rows in (kept.get("runs", {}) if kept.get("at_feedbacks") == args.at else {}).items()
        for task, method, seed in [key.split("/")]
    }
    if args.work.is_dir():
        pairs |= paired_rounds(read_points(args.csv), LocalStore(args.work), args.at)
    if not pairs:
        raise SystemExit(
            f"no run kept in {args.results} or in {args.work} is learned and measured up to {args.at} "
            "feedbacks yet: run feedback_efficiency.py first, or name its work folder"
        )
    table = summary(pairs)
    rows = [
        "| task | method | seeds | good in training batches | evaluation success | gap |",
        "|---|---|---|---|---|---|",
    ]
    for task, method in sorted(table, key=lambda c: (c[0], METHODS.index(c[1]))):
        cell = table[(task, method)]
        rows.append(
            f"| {task} | {method} | {cell['seeds']} | {cell['batch_good']:.3f} | {cell['evaluation']:.3f} "
            f"| {cell['gap']:+.3f}" + ("" if cell["gap_std"] is None else f" ± {cell['gap_std']:.3f}") + " |"
        )
    markdown = "\n".join(
        [
            f"### Guided training batches against the plain-noise evaluation (to {args.at} feedbacks)",
            "",
            f"Per run, the mean over its rounds 1, 2, ... up to {args.at} feedbacks (round 0 is the base",
            "model's) of the share of good images in the round's training batch and of the evaluation",
            "success rate of the same policy (fixed plain noises); then the mean over seeds, and the",
            "gap's sample std over seeds (none for one seed).",
            "",
            *rows,
        ]
    )
    figures = {
        "at_feedbacks": args.at,
        "cells": {f"{t}/{m}": v for (t, m), v in table.items()},
        "runs": {f"{t}/{m}/{s}": rows for (t, m, s), rows in pairs.items()},
    }
    if args.results == RESULTS_DIR / "guidance_gap.json":
        write_result("guidance_gap", figures, markdown)
    else:
        args.results.write_text(json.dumps(figures, indent=2) + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
