"""Feedback efficiency: success rate against feedbacks spent, for every task and method (the paper's tables).

For each (task, method, seed): a training run on the toy model with a simulated annotator, evaluated
before the first round and after every round on a fixed set of images from fixed plain N(0, I) noises
(never the guided ones), judged by the task's judge. Every point is appended to
benchmarks/results/feedback_efficiency.csv as soon as it is measured, and every run checkpoints through
its own store under benchmarks/.work/: a killed benchmark continues where it stopped, and points
already in the CSV are skipped. An unfinished run that cannot go on from its points (its work folder
gone with a fresh clone, or points lost while the folder stayed) starts over, and its points from
before are dropped: a curve is one run's. Slices run alone (--task, --method, --seeds), so the grid
can be spread over sessions or machines.

    python benchmarks/feedback_efficiency.py --task counting --method hero d3po --seeds 0 1 2
    python benchmarks/feedback_efficiency.py --jobs 2      # two runs at a time, one thread each
    HERO_MODEL__DEVICE=cuda python benchmarks/feedback_efficiency.py --jobs 12   # the grid on a GPU
    python benchmarks/feedback_efficiency.py --report      # plot + table from the CSV only

Round 0 is the base model: a fresh LoRA is the identity, so its rate is measured once per task and
shared by every method and seed (same noises, same model).
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import io
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from results_io import RESULTS_DIR, write_result

from hero_ml.adapters.storage import LocalStore
from hero_ml.config import HeroConfig, load_config, with_overrides
from hero_ml.run_lease import RunLease
from hero_ml.run_store import RunStore
from hero_ml.toy.evaluate import task_success_rate
from hero_ml.toy.task import load_task, task_names
from hero_ml.training import TrainingRun

METHODS = ("hero", "hero-noguide", "ddpo-binary", "d3po")
CSV_PATH = RESULTS_DIR / "feedback_efficiency.csv"
COLUMNS = ("task", "method", "seed", "round", "feedbacks", "success_rate")
WORK = Path(__file__).parent / ".work"
# What a point's value depends on: the learning sections of the config, less what each run sets
# itself (prompt, seed, budget, task) and what changes speed only. Points of two settings never mix.
LEARNING_SECTIONS = ("model", "sampling", "encoder", "ddpo", "d3po", "guidance", "feedback", "simulation")
NOT_LEARNING = {
    "model": {"device", "compile", "channels_last", "allow_download"},
    "sampling": {"prompt", "seed", "sub_batch_size"},
    "feedback": {"budget"},
    "simulation": {"task", "eval_images"},
}


def read_points(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return [
            {
                **row,
                "seed": int(row["seed"]),
                "round": int(row["round"]),
                "feedbacks": int(row["feedbacks"]),
                "success_rate": float(row["success_rate"]),
            }
            for row in csv.DictReader(handle)
        ]


def append_point(path: Path, point: dict) -> None:
    """Append one row, under an exclusive lock: parallel runs (--jobs) share the file. A point already
    there (the same run and round, e.g. from a worker left running by a killed grid) is not repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        key = ("task", "method", "seed", "round")
        if any(all(p[k] == point[k] for k in key) for p in read_points(path)):
            return
        row = io.StringIO()
        writer = csv.DictWriter(row, fieldnames=COLUMNS)
        if handle.seek(0, os.SEEK_END) == 0:  # after the lock: another run may have written since open
            writer.writeheader()
        writer.writerow({k: point[k] for k in COLUMNS})
        handle.write(row.getvalue())


def drop_points(path: Path, task: str, method: str, seed: int) -> int:
    """Remove a run's learned points (round 0, the shared base, stays), rewriting the file in place
    under the same lock as append_point: a parallel run's appends are neither lost nor doubled.
    Returns how many were removed."""
    with path.open("r+", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        points = read_points(path)
        kept = [
            p
            for p in points
            if (p["task"], p["method"], p["seed"]) != (task, method, seed) or p["round"] == 0
        ]
        handle.seek(0)
        handle.truncate()
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: p[k] for k in COLUMNS} for p in kept)
    return len(points) - len(kept)


def learning_settings(config: HeroConfig) -> dict:
    dump = config.model_dump(mode="json", include=set(LEARNING_SECTIONS))
    return {
        section: {k: v for k, v in fields.items() if k not in NOT_LEARNING.get(section, set())}
        for section, fields in dump.items()
    }


def check_settings(points_path: Path, config: HeroConfig) -> None:
    """The points file's settings are the config's; recorded beside it on first use. Differing
    settings stop the run before a point of another config is appended."""
    path = points_path.with_suffix(".settings.json")
    settings = learning_settings(config)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return
    recorded = json.loads(path.read_text())
    # A field added after the file was written is read at its default: new fields default to the
    # behaviour from before they existed.
    defaults = learning_settings(HeroConfig())
    changed = [
        f"{section}.{key}: {was!r} in {path.name}, {value!r} now"
        for section, fields in settings.items()
        for key, value in fields.items()
        if (was := recorded.get(section, {}).get(key, defaults[section][key])) != value
    ]
    if changed:
        raise SystemExit(
            f"{points_path} holds points of other settings: {'; '.join(changed)}. Pass --csv with "
            f"another file (and --tag with another work folder) for these settings, or move the old "
            f"points away to start the grid again."
        )


def continues(done: set[int], latest_checkpoint: int | None) -> bool:
    """Whether a run can go on from its checkpoint and keep its points: every round before the
    checkpoint measured (round `latest_checkpoint` itself is measured on resuming) and none after it.
    Not so when the work folder is gone (another machine's, an ended session's) or the points were
    lost while the folder stayed."""
    learned = done - {0}
    if latest_checkpoint is None:
        return not learned
    return set(range(1, latest_checkpoint)) <= learned and all(r <= latest_checkpoint for r in learned)


def run_one(base: HeroConfig, task: str, method: str, seed: int, args: argparse.Namespace) -> None:
    done = {
        p["round"]
        for p in read_points(args.csv)
        if (p["task"], p["method"], p["seed"]) == (task, method, seed)
    }
    spec = load_task(task)
    config = with_overrides(
        base,
        {
            "run_id": f"{task}-{method}-{seed}",
            "method": method,
            "sampling": {"prompt": spec.prompts[0], "seed": seed},
            "feedback": {"budget": args.budget},
            "simulation": {"task": task, "eval_images": 0},
        },
    )
    rounds = config.rounds
    if done >= set(range(rounds + 1)):
        return
    store = LocalStore(args.work / args.tag)
    stored_run = RunStore(store, config.run_id)
    if not continues(done, stored_run.latest_checkpoint()):
        holder = RunLease(store, config.run_id).holder()
        if holder is not None:  # another grid on this work folder: its run is not ours to reset
            print(f"{config.run_id}: cannot go on from its points, and {holder}; left alone", flush=True)
            return
        # A curve must be one run's, and a run started afresh would not retrace old points bit for bit
        # (another CPU rounds differently): the points go, and so does the work folder.
        dropped = drop_points(args.csv, task, method, seed)
        shutil.rmtree(args.work / args.tag / stored_run.prefix, ignore_errors=True)
        done = {0} & done
        print(
            f"{config.run_id}: cannot go on from its points; {dropped} dropped, the run starts over",
            flush=True,
        )
    run = TrainingRun(config, store)
    since = time.perf_counter()  # the last point's time: a round's minutes, for planning the grid

    def measure() -> None:
        nonlocal since
        round_index = run.engine.round
        if round_index in done:
            return
        shared = [p for p in read_points(args.csv) if p["task"] == task and p["round"] == 0]
        if round_index == 0 and shared:  # the base model: identical for every method and seed
            rate = shared[0]["success_rate"]
        else:
            rate = task_success_rate(
                run.pipe, spec, args.eval_images, config.sampling, seed=0, batch_size=args.eval_batch
            )
        append_point(
            args.csv,
            {
                "task": task,
                "method": method,
                "seed": seed,
                "round": round_index,
                "feedbacks": run.engine.feedbacks,
                "success_rate": rate,
            },
        )
        now = time.perf_counter()
        print(
            f"{time.strftime('%H:%M:%S')} {task:9s} {method:12s} seed {seed} round {round_index:2d} "
            f"feedbacks {run.engine.feedbacks:5d} success {rate:.3f} ({now - since:.0f} s)",
            flush=True,
        )
        since = now

    with run:
        measure()
        while not run.done:
            batch = run.generate()
            run.learn(batch, run.feedback(batch))
            measure()


def curves(points: list[dict]) -> dict[tuple[str, str], dict[int, list[float]]]:
    """(task, method) -> feedbacks -> the success rates of the seeds measured there."""
    table: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        table[(p["task"], p["method"])][p["feedbacks"]].append(p["success_rate"])
    return table


def measured_by_every_seed(curve: dict[int, list[float]]) -> dict[int, list[float]]:
    """The curve's points every one of its seeds has reached (the base point, 0 feedbacks, is every
    seed's): while one seed's run is still going, the mean of the others alone would move a crossing.
    A seed with the base point alone (a run started, no round learned) has measured nothing yet: the
    base is the shared one, copied."""
    seeds = max((len(values) for f, values in curve.items() if f > 0), default=0)
    return {f: values for f, values in curve.items() if f == 0 or len(values) == seeds}


def feedbacks_to_reach(curve: dict[int, list[float]], target: float) -> int | None:
    """The first feedback count at which the seeds' mean success rate reaches the target (among the
    points every seed has reached)."""
    complete = measured_by_every_seed(curve)
    for feedbacks in sorted(complete):
        if np.mean(complete[feedbacks]) >= target:
            return feedbacks
    return None


def spread(values: list[float]) -> float | None:
    """The seeds' sample standard deviation (n - 1); None for one seed, which has no spread to show."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def around(curve: dict[int, list[float]], at: int) -> tuple[float, int] | None:
    """The mean of every seed's points at `at` and the rounds just before and after it, and how many
    points that is: a rate at one round of a swinging curve is one sample of the swing. None unless all
    three rounds are measured."""
    step = min((f for f in curve if f > 0), default=0)  # one round's feedbacks
    window = [curve.get(f, []) for f in (at - step, at, at + step)]
    if step == 0 or not all(window):
        return None
    values = [v for values in window for v in values]
    return float(np.mean(values)), len(values)


def efficiency_table(table: dict[tuple[str, str], dict[int, list[float]]], at: int) -> tuple[dict, list[str]]:
    """The paper-form table from the curves: per task the base, each method's rate at `at`
    feedbacks, and the feedbacks each baseline needs to reach HERO's rate there. Returns the figures
    (for the JSON) and the Markdown rows."""
    tasks = sorted({t for t, _ in table})
    figures: dict = {"at_feedbacks": at, "tasks": {}}
    header = " | ".join(f"{m} @{at}" for m in METHODS)
    rows = [
        f"| task | base | {header} | feedbacks a baseline needs to reach hero @{at} |",
        "|---|---|" + "---|" * len(METHODS) + "---|",
    ]
    for task in tasks:
        base = [v for (t, _), curve in table.items() if t == task for v in curve.get(0, [])[:1]]
        # to_reach_hero: None where a baseline has not reached it as far as measured_to
        entry: dict = {
            "base": base[0] if base else None,
            "methods": {},
            "to_reach_hero": {},
            "measured_to": {},
        }
        cells = []
        for method in METHODS:
            values = table.get((task, method), {}).get(at)
            if values:
                std = spread(values)
                entry["methods"][method] = {"mean": float(np.mean(values)), "std": std}
                entry["methods"][method]["seeds"] = len(values)
                smoothed = around(table[(task, method)], at)
                entry["methods"][method]["around"] = None if smoothed is None else smoothed[0]
                cells.append(
                    f"{np.mean(values):.3f}"
                    + ("" if std is None else f" ± {std:.3f}")
                    + f" (n={len(values)})"
                    + ("" if smoothed is None else f"; ~{smoothed[0]:.3f}")
                )
            else:
                cells.append("—")
        needs = []
        hero = entry["methods"].get("hero")
        if hero is not None and entry["base"] is not None and hero["mean"] <= entry["base"]:
            needs.append(f"— (hero @{at} is not above the base)")  # every curve starts there: no figure
        elif hero is not None:
            # where HERO's own curve first reached its rate at `at`: on a curve that swings, a
            # baseline's crossing reads against this, not against `at`
            first = feedbacks_to_reach(table[(task, "hero")], entry["methods"]["hero"]["mean"])
            entry["hero_first_reached"] = first
            needs.append(f"(hero itself {first})")
            for method in METHODS[1:]:
                curve = table.get((task, method))
                if curve and max(curve) > 0:  # a run with a learned round, not the base point alone
                    reached = feedbacks_to_reach(curve, entry["methods"]["hero"]["mean"])
                    measured_to = max(measured_by_every_seed(curve))
                    entry["to_reach_hero"][method] = reached
                    entry["measured_to"][method] = measured_to
                    needs.append(  # multiples of a round's share of `at`: shown exactly (:g), not rounded
                        f"{method} {reached} ({reached / at:g}x)"
                        if reached is not None
                        else f"{method} > {measured_to}"
                    )
        figures["tasks"][task] = entry
        base_cell = f"{entry['base']:.3f}" if entry["base"] is not None else "—"
        rows.append(f"| {task} | {base_cell} | " + " | ".join(cells) + f" | {'; '.join(needs) or '—'} |")
    return figures, rows


def report(path: Path, at: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = read_points(path)
    if not points:
        print(f"no points yet in {path}")
        return
    table = curves(points)
    tasks = sorted({t for t, _ in table})
    figure, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        for method in METHODS:
            curve = table.get((task, method))
            if not curve:
                continue
            curve = measured_by_every_seed(curve)  # as the table reads it: no running seed's tail
            xs = sorted(curve)
            mean = np.array([np.mean(curve[x]) for x in xs])
            std = np.array([spread(curve[x]) or 0.0 for x in xs])
            axis.plot(xs, mean, marker=".", label=method)
            axis.fill_between(xs, mean - std, mean + std, alpha=0.2)
        axis.set_title(task)
        axis.set_xlabel("feedbacks")
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("success rate")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)

    figures, rows = efficiency_table(table, at)
    table_md = "\n".join(
        [
            "### Feedback efficiency (toy world)",
            "",
            f"Success rate after {at} feedbacks (mean ± sample std over seeds, none for one seed; the",
            "judge on a fixed evaluation set from fixed plain noises; after `~`, the mean over the seeds'",
            "points one round before, at and after it, as the curves swing from round to round), and the",
            "feedbacks each baseline needs to reach HERO's rate there (the first crossing of the seeds'",
            f"mean curve, as far as every seed has reached; Nx = those feedbacks / {at}, the paper's",
            "figure; in brackets, where HERO's own curve first reached that rate: on a curve that swings",
            f"it can be long before {at}).",
            "Every point: `results/feedback_efficiency.csv`.",
            "",
            *rows,
            "",
            "![feedback efficiency](results/feedback_efficiency.png)",
        ]
    )
    write_result("feedback_efficiency", figures, table_md)
    print(table_md)


def start_worker(threads: int, grid_pid: int, poll_s: float = 2.0) -> None:
    """A grid worker's set-up: its torch threads, and an exit as soon as the grid process is gone. A
    worker left running by a killed grid would go on appending points, with the code it loaded then
    (a run stopped mid-round resumes from its checkpoint, as after any crash)."""
    torch.set_num_threads(threads)

    def exit_with_the_grid() -> None:
        while os.getppid() == grid_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=exit_with_the_grid, name="exit-with-the-grid", daemon=True).start()


def run_in_parallel(base: HeroConfig, runs: list[tuple[str, str, int]], args: argparse.Namespace) -> None:
    """Each run in its own process (spawned: CUDA does not survive a fork), --jobs at a time, in the
    grid's order. A failed run is reported and the others go on; the exit status says whether any failed."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    context = multiprocessing.get_context("spawn")
    failed = []
    with ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=start_worker, initargs=(threads, os.getpid())
    ) as pool:
        futures = {pool.submit(run_one, base, *run, args): run for run in runs}
        for future in as_completed(futures):
            if future.exception() is not None:
                failed.append(futures[future])
                print(f"run {futures[future]} failed: {future.exception()!r}", file=sys.stderr, flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed: {failed}; their points so far are kept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task", nargs="+", default=task_names(), help="Tasks to run (default: all shipped)."
    )
    parser.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS, help="Methods to run.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Seeds of the runs.")
    parser.add_argument("--budget", type=int, default=1024, help="Feedbacks each run spends.")
    parser.add_argument("--eval-images", type=int, default=256, help="Images of the fixed evaluation set.")
    parser.add_argument("--eval-batch", type=int, default=64, help="Images denoised at once in evaluation.")
    parser.add_argument(
        "--config", type=Path, help="HERO config with the hyper-parameters (default: the defaults)."
    )
    parser.add_argument("--tag", default="default", help="Names the work folder of this grid's checkpoints.")
    parser.add_argument("--work", type=Path, default=WORK, help="Folder of the work folders.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs at a time, each in its own process.")
    parser.add_argument(
        "--threads", type=int, default=0, help="Torch threads of each parallel run (default: CPUs / jobs)."
    )
    parser.add_argument("--at", type=int, default=512, help="Feedbacks of the table's comparison point.")
    parser.add_argument("--report", action="store_true", help="Only write the plot and table from the CSV.")
    parser.add_argument(
        "--csv", type=Path, default=CSV_PATH, help="Points file; another than the default skips RESULTS.md."
    )
    args = parser.parse_args()
    if args.jobs < 1 or args.threads < 0:
        parser.error("--jobs must be at least 1 and --threads at least 0 (0: CPUs / jobs)")
    if not args.report:
        base = load_config(args.config)
        check_settings(args.csv, base)
        # seeds outermost: the table has every (task, method) cell at n=1 before any at n=2
        runs = [(task, method, seed) for seed in args.seeds for task in args.task for method in args.method]
        if args.jobs == 1:
            for run in runs:
                run_one(base, *run, args)
        else:
            run_in_parallel(base, runs, args)
    if args.csv == CSV_PATH:
        report(args.csv, args.at)


if __name__ == "__main__":
    main()
