"""The benchmark scripts' own arithmetic (their runs live in benchmarks/, not in the test suite)."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import feedback_efficiency as fe
import gpu_round as gr
import guidance_gap as gg
import guided_evaluation as ge
import hyperparameter_probe as hp
import pytest
import results_io
import torch
import unet_step

from hero_ml.adapters.storage import LocalStore
from hero_ml.config import HeroConfig, with_overrides
from hero_ml.diffusion.lora import add_lora
from hero_ml.engine import Engine
from hero_ml.run_lease import RunLease


def test_curves_group_seeds_and_the_first_crossing_of_the_mean_is_found() -> None:
    points = [
        {"task": "t", "method": "m", "seed": s, "round": r, "feedbacks": 64 * r, "success_rate": v}
        for s, values in enumerate([(0.1, 0.3, 0.6), (0.2, 0.5, 0.6)])
        for r, v in enumerate(values)
    ]
    curve = fe.curves(points)[("t", "m")]
    assert curve == {0: [0.1, 0.2], 64: [0.3, 0.5], 128: [0.6, 0.6]}
    assert fe.feedbacks_to_reach(curve, 0.4) == 64  # the mean at 64 is exactly 0.4
    assert fe.feedbacks_to_reach(curve, 0.15) == 0
    assert fe.feedbacks_to_reach(curve, 0.7) is None
    # a third seed still running (measured to 64): its 64 counts, the others' 128 alone does not
    running = fe.curves([*points, *({**points[r], "seed": 2, "success_rate": 0.0} for r in range(2))])
    curve = running[("t", "m")]
    assert fe.measured_by_every_seed(curve) == {0: [0.1, 0.2, 0.0], 64: [0.3, 0.5, 0.0]}
    assert fe.feedbacks_to_reach(curve, 0.25) == 64 and fe.feedbacks_to_reach(curve, 0.4) is None
    # a third seed just started (its base point alone, the shared one): it hides nothing of the others
    started = fe.curves([*points, {**points[0], "seed": 2}])[("t", "m")]
    assert fe.measured_by_every_seed(started) == {0: [0.1, 0.2, 0.1], 64: [0.3, 0.5], 128: [0.6, 0.6]}
    assert fe.measured_by_every_seed({0: [0.1, 0.1]}) == {0: [0.1, 0.1]}  # no round learned yet


def test_the_paper_form_table_sets_each_baseline_against_heros_rate() -> None:
    base = 0.25
    table = {
        ("up", "hero"): {0: [base], 64: [0.5, 0.5], 128: [0.25, 0.75]},  # 0.5 at 128, first at 64
        ("up", "d3po"): {0: [base], 64: [0.25], 128: [0.375], 192: [0.5]},
        ("up", "ddpo-binary"): {0: [base], 64: [0.25], 128: [0.25], 192: [0.25]},
        ("up", "hero-noguide"): {0: [base]},  # the shared base point alone: no run yet, no figure
        ("down", "hero"): {0: [base], 128: [0.125]},  # below the base: every curve "reaches" it at 0
        ("down", "d3po"): {0: [base], 128: [0.5]},
    }
    figures, rows = fe.efficiency_table(table, at=128)
    up = figures["tasks"]["up"]
    assert up["base"] == base and up["methods"]["hero"] == {
        "mean": 0.5,
        "std": pytest.approx(0.5**0.5 / 2),  # the sample std of 0.25 and 0.75
        "seeds": 2,
        "around": None,
    }
    assert up["methods"]["d3po"]["around"] == (0.25 + 0.375 + 0.5) / 3  # the rounds at 64, 128 and 192
    assert up["hero_first_reached"] == 64 and up["to_reach_hero"] == {"ddpo-binary": None, "d3po": 192}
    assert up["measured_to"] == {"ddpo-binary": 192, "d3po": 192}
    assert rows[3] == (
        "| up | 0.250 | 0.500 ± 0.354 (n=2) | — | 0.250 (n=1); ~0.250 | 0.375 (n=1); ~0.375 "
        "| (hero itself 64); ddpo-binary > 192; d3po 192 (1.5x) |"
    )
    table[("up", "d3po")][160] = [0.5]  # 160 / 128: shown exactly, not rounded half to even (1.2x)
    assert "d3po 160 (1.25x)" in fe.efficiency_table(table, at=128)[1][3]
    assert figures["tasks"]["down"]["to_reach_hero"] == {}
    assert rows[2].endswith("| — (hero @128 is not above the base) |") and rows[2].startswith("| down |")


def test_grid_workers_exit_when_the_grid_is_killed(tmp_path: Path) -> None:
    grid = tmp_path / "grid.py"
    grid.write_text(
        textwrap.dedent(f"""
            import multiprocessing, os, sys, time
            from concurrent.futures import ProcessPoolExecutor
            sys.path.insert(0, {str(Path(fe.__file__).parent)!r})
            from feedback_efficiency import start_worker

            if __name__ == "__main__":
                context = multiprocessing.get_context("spawn")
                setup = dict(initializer=start_worker, initargs=(1, os.getpid(), 0.1))
                pool = ProcessPoolExecutor(1, context, **setup)
                print(pool.submit(os.getpid).result(), flush=True)
                pool.submit(time.sleep, 600)  # a run, busy
                time.sleep(600)
        """)
    )
    process = subprocess.Popen([sys.executable, str(grid)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    worker = int(process.stdout.readline())

    def running(pid: int) -> bool:  # an orphan's zombie is not running
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    assert running(worker)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the grid's worker went on running after the grid was killed")


def test_points_round_trip_through_the_csv(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    point = {"task": "t", "method": "hero", "seed": 2, "round": 3, "feedbacks": 192, "success_rate": 0.25}
    fe.append_point(path, point)
    fe.append_point(path, {**point, "round": 4, "feedbacks": 256})
    fe.append_point(path, point)  # measured twice (two processes on one run): kept once
    assert fe.read_points(path) == [point, {**point, "round": 4, "feedbacks": 256}]
    assert path.read_text().splitlines()[0] == ",".join(fe.COLUMNS)


def test_points_of_other_learning_settings_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    fe.check_settings(path, HeroConfig())
    recorded = json.loads(path.with_suffix(".settings.json").read_text())
    assert recorded["encoder"]["lr"] == HeroConfig().encoder.lr
    # what each run sets itself, and speed-only settings, do not change the points
    fe.check_settings(path, HeroConfig(sampling={"seed": 3, "sub_batch_size": 8}, model={"device": "cuda"}))
    other = HeroConfig().encoder.lr / 10
    with pytest.raises(
        SystemExit, match=rf"encoder.lr: {HeroConfig().encoder.lr!r} in points.settings.json, {other!r} now"
    ):
        fe.check_settings(path, HeroConfig(encoder={"lr": other}))


def test_a_field_newer_than_the_points_counts_at_its_default(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    fe.check_settings(path, HeroConfig())
    settings = path.with_suffix(".settings.json")
    recorded = json.loads(settings.read_text())
    del recorded["ddpo"]["kl_to_base"]  # points written before the field existed
    settings.write_text(json.dumps(recorded))
    fe.check_settings(path, HeroConfig())
    with pytest.raises(SystemExit, match=r"ddpo.kl_to_base: 0.0 in points.settings.json, 2.0 now"):
        fe.check_settings(path, HeroConfig(ddpo={"kl_to_base": 2.0}))


def test_reward_auc_counts_the_good_bad_pairs_ordered_right() -> None:
    good = (True, True, False, False)
    assert hp.reward_auc([0.9, 0.8, 0.1, 0.2], good) == 1.0
    # good 0.1 and 0.8 against bad 0.9 and 0.2: only 0.8 > 0.2 of the four pairs
    assert hp.reward_auc([0.1, 0.8, 0.9, 0.2], good) == 0.25
    assert hp.reward_auc([0.5, 0.7, 0.5, 0.1], good) == 0.875  # the tie 0.5 = 0.5 counts half
    assert hp.reward_auc([0.5, 0.5], (True, True)) is None  # nothing bad to rank against
    assert hp.reward_auc(None, (True, False)) is None


def test_the_probe_table_has_a_row_per_seed_with_what_reruns_it(tmp_path: Path, monkeypatch) -> None:
    csv_path = tmp_path / "probe.csv"
    header = ",".join(hp.COLUMNS)
    rows = [
        f'binding,hero-noguide,defaults,"{{""encoder"": {{}}}}",512,{seed},0.156,{rate},481.0,[]'
        for seed, rate in ((0, 0.40234375), (1, 0.25))
    ]
    csv_path.write_text("\n".join([header, *rows]) + "\n")
    monkeypatch.setattr(hp, "CSV_PATH", csv_path)
    monkeypatch.setattr(results_io, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(results_io, "RESULTS_MD", tmp_path / "RESULTS.md")
    hp.report()
    table = (tmp_path / "RESULTS.md").read_text()
    row = '| binding | hero-noguide | defaults | `{"encoder": {}}` | 512 | 0 | 0.156 | **0.402** | 481.0 |'
    assert row in table
    assert "| 512 | 1 | 0.156 | **0.250** |" in table
    assert json.loads((tmp_path / "hyperparameter_probe.json").read_text())["probes"][1]["seed"] == "1"


def test_a_guided_step_counts_both_branches_and_training_adds_the_backward(tiny_pipe) -> None:
    processors = dict(tiny_pipe.unet.attn_processors)
    unconditional = gr.unet_flops(tiny_pipe, 1.0, backward=False)  # one branch: CFG off
    guided = gr.unet_flops(tiny_pipe, 5.0, backward=False)
    trained = gr.unet_flops(tiny_pipe, 5.0, backward=True)
    assert guided == 2 * unconditional > 0
    assert 2 * guided < trained < 4 * guided  # the backward of a frozen UNet: 1-2x its forward
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == {
        k: type(v) for k, v in processors.items()
    }  # SDPA is back after counting with math attention


def test_a_rounds_work_and_its_share_of_the_peak() -> None:
    config = HeroConfig(
        sampling={"images_per_round": 4, "num_steps": 10},
        ddpo={"timesteps_per_trajectory": 5, "inner_epochs": 2},
    )
    flops = {"unet_sampling_step": 3, "unet_training_step": 7, "vae_decode": 11}
    assert gr.round_work(config, flops) == {"sampling": 4 * 10 * 3, "decode": 4 * 11, "ddpo": 4 * 5 * 2 * 7}
    result = {
        "first_round_s": 9.0,
        "seconds": 4.0,
        "phases": {"sampling": 2.0, "decode": 0.5, "encoder": 0.5, "ddpo": 7.0},
        "peak_gib": {"generate": 1.0, "encoder": 0.1, "ddpo": 2.0},
        "log_prob_mismatch": {"mean_abs": 0.5},
        "optimizer_steps": 6,
        "skipped_steps": 2,
        "loss_scale": 32768.0,
    }
    figures = gr.figures_of("hero", result, config, flops, peak=60e-12, world=2)  # 60 FLOP/s a GPU
    assert figures["tflops_achieved"]["sampling"] == pytest.approx(120 / 2.0 / 1e12)
    # achieved FLOP/s over the peak of both GPUs (120): 60, 88 and 40 FLOP/s
    assert figures["share_of_bf16_peak"] == {"sampling": 0.5, "decode": 0.733, "ddpo": 0.333}
    assert figures["sampling_lower_bound_s"] == 1.0 and figures["sampling_over_lower_bound"] == 2.0
    assert figures["images_per_s"] == {"sampling": 2.0, "decode": 8.0}
    assert figures["log_prob_mismatch"] == {"mean_abs": 0.5}
    assert (figures["dtype"], figures["compiled"]) == (config.model.dtype, config.model.compile)
    assert (figures["optimizer_steps"], figures["skipped_steps"], figures["loss_scale"]) == (6, 2, 32768.0)


def test_a_failed_gpu_round_setup_is_named_and_the_others_figures_are_written_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a GPU lease is short and once: a setup that dies (an OOM, a compile error; faked here, a CPU
    # cannot produce them) must not take the figures of the setups before it along
    monkeypatch.setattr(results_io, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(results_io, "RESULTS_MD", tmp_path / "RESULTS.md")
    run_setup = gr.run_setup

    def reference_runs_out_of_memory(config: HeroConfig, *args: object) -> dict:
        if config.ddpo.gradient_accumulation_steps == 4:  # the reference setup's DDPO 2 x 4
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run_setup(config, *args)

    monkeypatch.setattr(gr, "run_setup", reference_runs_out_of_memory)
    argv = ["gpu_round.py", "--arch", "tiny", "--device", "cpu", "--images", "2", "--steps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--setups", "reference,hero", "--name", "gpu-test"])
    with pytest.raises(SystemExit, match="failed: reference"):
        gr.main()
    written = json.loads((tmp_path / "gpu-test.json").read_text())
    assert [r["setup"] for r in written["setups"]] == ["hero"]  # run after the failure, still measured
    assert written["failed"] == [
        {"setup": "reference", "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    ]
    assert written["setups"][0]["optimizer_steps"] >= 1 and written["setups"][0]["skipped_steps"] == 0
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| hero |" in table and "Failed: reference: RuntimeError: CUDA out of memory" in table


def test_the_hero_setup_runs_in_float16_with_its_loss_scale_on_a_cpu(tmp_path: Path) -> None:
    # the rehearsal runs every setup in float32 (no half tensor cores on a CPU): the float16 path with
    # its GradScaler, the lease's first figure, runs here, at the tiny size
    args = argparse.Namespace(arch="tiny", device="cpu", images=2, steps=2)
    overrides = {**gr.setups(args.images)["hero"], "storage": {"local_root": str(tmp_path)}}
    config = with_overrides(gr.base_config(args), overrides)
    assert config.model.dtype == "float16"
    flops: dict[str, int] = {}
    result = gr.run_setup(config, None, flops)
    assert flops["unet_sampling_step"] > 0 and result["seconds"] > 0
    assert result["optimizer_steps"] + result["skipped_steps"] >= 1
    # GradScaler's scale starts at 2**16 and halves at each skipped step (it grows after 2000)
    assert result["loss_scale"] is not None and 0 < result["loss_scale"] <= 2.0**16
    assert result["log_prob_mismatch"]["mean_abs"] < 1e-2  # the recorded float16 log-probs, recomputed


def test_a_unet_step_variant_casts_the_base_and_the_lora_apart_and_sets_the_layout(tiny_pipe) -> None:
    unet = tiny_pipe.unet
    unet.requires_grad_(False)
    lora = add_lora(unet, rank=2, alpha=2)
    unet_step.apply_variant(unet, torch.bfloat16, torch.float32, channels_last=True)
    assert {p.dtype for p in lora} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    unet_step.apply_variant(unet, torch.float16, torch.bfloat16, channels_last=False)
    assert {p.dtype for p in lora} == {torch.bfloat16}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.float16}
    assert unet.conv_in.weight.is_contiguous()


def test_a_unet_step_variant_computes_the_lora_its_way(tiny_pipe) -> None:
    unet, cpu = tiny_pipe.unet, torch.device("cpu")
    add_lora(unet, rank=2, alpha=2)
    layers = [m for m in unet.modules() if hasattr(m, "cast_input_dtype_enabled")]

    def seen(mode: str, dtype: torch.dtype) -> tuple[bool, set[bool]]:
        with unet_step.lora_compute(unet, mode, dtype, cpu):
            return torch.is_autocast_enabled("cpu"), {m.cast_input_dtype_enabled for m in layers}

    assert layers and seen("cast", torch.bfloat16) == (False, {True})
    assert seen("autocast", torch.bfloat16) == (True, {True})
    assert seen("autocast, no input cast", torch.bfloat16) == (True, {False})
    assert seen("autocast", torch.float32) == (False, {True})  # a CPU's float32 rows: nothing to autocast
    assert {m.cast_input_dtype_enabled for m in layers} == {True}  # restored


def test_recorded_log_probs_match_their_recomputation_in_float32(tiny_pipe) -> None:
    config = HeroConfig(
        model={"source": "random:tiny"},
        sampling={"images_per_round": 4, "num_steps": 4, "sub_batch_size": 4},
        ddpo={"timesteps_per_trajectory": 3, "clip_range": 1e-4},
    )
    engine = Engine(config, tiny_pipe)
    with torch.no_grad():  # a non-zero LoRA, so the adapter is part of what is recomputed
        for p in engine.lora_params:
            p.normal_(0, 0.1)
    batch = engine.generate()
    mismatch = gr.log_prob_mismatch(engine, batch, micro_batch=2)
    assert mismatch["clip_range"] == 1e-4
    assert mismatch["mean_abs"] < 1e-6 and mismatch["beyond_clip_range"] == 0.0
    with torch.no_grad():  # the policy moves after sampling: the difference is seen and counted
        for p in engine.lora_params:
            p.add_(0.5)
    moved = gr.log_prob_mismatch(engine, batch, micro_batch=2)
    assert moved["max_abs"] >= moved["mean_abs"] > 1e-3 and moved["beyond_clip_range"] > 0.5


def tiny_grid_config(tmp_path: Path) -> Path:
    """A config file for grid runs of seconds: 4 images a round, 2 steps, a few encoder epochs."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "sampling: {images_per_round: 4, num_steps: 2, sub_batch_size: 4}\n"
        "encoder: {epochs_per_round: 2, triplets_per_epoch: 4}\n"
        "ddpo: {timesteps_per_trajectory: 1, train_batch_size: 4, inner_epochs: 1}\n"
    )
    return config


def test_the_grid_runs_in_parallel_processes_and_a_second_call_skips_its_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_grid_config(tmp_path)
    points = tmp_path / "points.csv"
    argv = [
        "feedback_efficiency.py", "--task", "counting", "binding", "--method", "hero", "--seeds", "0",
        "--budget", "8", "--eval-images", "4", "--eval-batch", "4", "--config", str(config),
        "--csv", str(points), "--work", str(tmp_path / "work"), "--jobs", "2", "--threads", "1",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    fe.main()
    rows = fe.read_points(points)
    assert sorted((p["task"], p["round"], p["feedbacks"]) for p in rows) == [
        (task, r, 4 * r) for task in ("binding", "counting") for r in range(3)
    ]
    assert points.read_text().count("task,method") == 1  # one header, whichever run wrote first
    before = points.read_text()
    fe.main()  # every point is there: nothing runs, nothing is appended
    assert points.read_text() == before


def test_a_run_whose_work_folder_is_gone_starts_over_and_its_old_points_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, points = tiny_grid_config(tmp_path), tmp_path / "points.csv"
    point = {"task": "counting", "method": "hero", "seed": 0, "round": 0, "feedbacks": 0, "success_rate": 0.5}
    other = {**point, "seed": 1, "round": 1, "feedbacks": 4, "success_rate": 0.75}
    # a point of a run stopped after round 1, its work folder lost; no success rate is 2
    stale = {**point, "round": 1, "feedbacks": 4, "success_rate": 2.0}
    for p in [point, stale, other]:
        fe.append_point(points, p)
    monkeypatch.setattr(sys, "argv", [
        "feedback_efficiency.py", "--task", "counting", "--method", "hero", "--seeds", "0", "--budget", "8",
        "--eval-images", "4", "--eval-batch", "4", "--config", str(config), "--csv", str(points),
        "--work", str(tmp_path / "work"),
    ])  # fmt: skip
    fe.main()
    rows = fe.read_points(points)
    assert point in rows and other in rows  # the shared base and another run's point are kept
    ours = sorted((p["round"], p["feedbacks"]) for p in rows if p["seed"] == 0)
    assert ours == [(0, 0), (1, 4), (2, 8)]  # measured once each, by the new run
    assert stale not in rows
    # the points lost while the work folder stayed: resuming from its last checkpoint would leave a gap
    fe.drop_points(points, "counting", "hero", 0)
    lost = {**stale, "round": 2, "feedbacks": 8}
    fe.append_point(points, lost)
    with RunLease(LocalStore(tmp_path / "work" / "default"), "counting-hero-0"):
        fe.main()  # a live process holds the run: neither its points nor its folder are touched
    assert lost in fe.read_points(points)
    fe.main()
    rows = fe.read_points(points)
    assert sorted((p["round"], p["feedbacks"]) for p in rows if p["seed"] == 0) == [(0, 0), (1, 4), (2, 8)]
    assert all(p["success_rate"] <= 1 for p in rows)  # the stale point went, the run started over
    shutil.rmtree(tmp_path / "work")
    fe.main()  # complete now: a complete run needs no work folder and is not run again
    assert fe.read_points(points) == rows


def test_a_run_continues_from_its_checkpoint_only_when_its_points_lead_up_to_it() -> None:
    assert fe.continues(set(), None) and fe.continues({0}, None)  # nothing learned yet
    assert not fe.continues({0, 1}, None)  # points, no work folder
    assert fe.continues({0}, 0) and fe.continues({0}, 1)  # checkpoint 1's point is measured on resuming
    assert fe.continues({0, 1, 2}, 3) and fe.continues({0, 1, 2, 3}, 3)
    assert not fe.continues({0}, 6)  # points 1-5 lost: the curve would have a gap
    assert not fe.continues({0, 1, 3}, 4)
    assert not fe.continues({0, 1, 2, 3}, 2)  # points past the checkpoint: not this run's


def test_drop_points_removes_one_runs_learned_points_in_place(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    point = {"task": "t", "method": "hero", "seed": 0, "round": 0, "feedbacks": 0, "success_rate": 0.25}
    runs = [point, {**point, "round": 1, "feedbacks": 64}, {**point, "seed": 1, "round": 1, "feedbacks": 64}]
    for p in runs:
        fe.append_point(path, p)
    assert fe.drop_points(path, "t", "hero", 0) == 1
    assert fe.read_points(path) == [runs[0], runs[2]]
    assert path.read_text().count("task,method") == 1
    assert fe.drop_points(path, "t", "hero", 0) == 0


def test_guidance_gap_pairs_each_rounds_batch_with_the_same_policys_evaluation(tmp_path: Path) -> None:
    from hero_ml.engine import RoundStats
    from hero_ml.run_store import RunStore

    store = LocalStore(tmp_path)
    good = {"hero": [16, 32, 48], "hero-noguide": [8, 16, 24]}  # rounds 0, 1, 2 of 64 images
    points = []
    for method, goods in good.items():
        run = RunStore(store, f"t-{method}-0")
        for r, g in enumerate(goods):
            stats = RoundStats(
                round=r, feedbacks=64 * (r + 1), good=g, bad=64 - g, new_best=True, label_agreement=1.0,
                encoder_loss_first=None, encoder_loss_last=None, reward_good_mean=None, reward_bad_mean=None,
                update_loss=None, approx_kl=None, clip_fraction=None, optimizer_steps=32,
            )  # fmt: skip
            run.save_stats(stats)
            points.append(
                {
                    "task": "t",
                    "method": method,
                    "seed": 0,
                    "round": r,
                    "feedbacks": 64 * r,
                    "success_rate": 0.25,
                }
            )
        store.put(f"{run.prefix}/progress.json", json.dumps({"checkpoint": 2}).encode())
    # a run not yet evaluated at 128 feedbacks (round 2) is left out, not half-counted
    points = [p for p in points if (p["method"], p["round"]) != ("hero-noguide", 2)]
    pairs = gg.paired_rounds(points, store, at=128)  # rounds 1 and 2
    assert pairs == {
        ("t", "hero", 0): [
            {"round": 1, "batch_good": 0.5, "evaluation": 0.25},
            {"round": 2, "batch_good": 0.75, "evaluation": 0.25},
        ]
    }
    assert gg.summary(pairs) == {
        ("t", "hero"): {"seeds": 1, "batch_good": 0.625, "evaluation": 0.25, "gap": 0.375, "gap_std": None}
    }


def test_guidance_gap_keeps_the_runs_it_paired_when_their_work_folder_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the grid spreads over machines: a work folder holds only the runs of the machine that ran them
    csv, results = tmp_path / "points.csv", tmp_path / "gap.json"
    csv.write_text("task,method,seed,round,feedbacks,success_rate\n")
    kept = {"round": 1, "batch_good": 0.5, "evaluation": 0.25}
    results.write_text(json.dumps({"at_feedbacks": 64, "runs": {"t/hero/0": [kept], "t/hero/1": [kept]}}))
    argv = ["guidance_gap.py", "--csv", str(csv), "--work", str(tmp_path / "gone"), "--at", "64"]
    monkeypatch.setattr(sys, "argv", [*argv, "--results", str(results)])
    gg.main()
    figures = json.loads(results.read_text())
    assert figures["runs"] == {"t/hero/0": [kept], "t/hero/1": [kept]}
    assert figures["cells"]["t/hero"] == {
        "seeds": 2, "batch_good": 0.5, "evaluation": 0.25, "gap": 0.25, "gap_std": 0.0,
    }  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*argv, "--results", str(results), "--at", "128"])
    with pytest.raises(SystemExit, match="no run kept"):  # pairs of another --at are not this table's
        gg.main()


def test_baselines_are_set_against_heros_guided_rate_on_their_mean_curves() -> None:
    points = [
        {"task": t, "method": m, "seed": s, "round": r, "feedbacks": 64 * r, "success_rate": v}
        for t, m, s, values in [
            ("a", "d3po", 0, (0.1, 0.3, 0.5)),
            ("a", "d3po", 1, (0.1, 0.5, 0.5)),  # mean 0.4 at 64
            ("a", "ddpo-binary", 0, (0.1, 0.2, 0.3)),
            ("a", "hero", 0, (0.1, 0.9, 0.9)),  # HERO's own curve is not a baseline
            ("b", "d3po", 0, (0.2, 0.2, 0.2)),
            ("b", "ddpo-binary", 0, (0.2,)),  # the shared base point alone: no run yet, no figure
        ]
        for r, v in enumerate(values)
    ]
    assert ge.baselines_to_reach(points, {"a": 0.4, "b": 0.3}) == {
        "a": {"ddpo-binary": None, "d3po": 64},
        "b": {"d3po": None},
    }
    # HERO's guided rate at or below the base: every curve "reaches" it at 0, which is no figure
    assert ge.baselines_to_reach(points, {"a": 0.1, "b": 0.15}) == {"a": None, "b": None}


def test_guided_evaluation_samples_each_hero_run_from_its_own_pool_at_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load as load_tensors

    from hero_ml.config import ModelConfig
    from hero_ml.diffusion.pipeline import load_configured_pipeline
    from hero_ml.engine import TENSORS
    from hero_ml.guidance import guided_initial_noise
    from hero_ml.run_store import RunStore
    from hero_ml.toy.evaluate import success_rate
    from hero_ml.toy.task import load_task

    config = tiny_grid_config(tmp_path)
    points, work, results = tmp_path / "points.csv", tmp_path / "work", tmp_path / "guided.json"
    monkeypatch.setattr(sys, "argv", [
        "feedback_efficiency.py", "--task", "counting", "--method", "hero", "hero-noguide", "--seeds", "0",
        "--budget", "8", "--eval-images", "4", "--eval-batch", "4", "--config", str(config),
        "--csv", str(points), "--work", str(work),
    ])  # fmt: skip
    fe.main()
    argv = ["guided_evaluation.py", "--csv", str(points), "--work", str(work / "default"), "--at", "8",
            "--eval-images", "4", "--results", str(results)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    ge.main()

    figures = json.loads(results.read_text())
    assert list(figures["runs"]) == ["counting/0"]  # hero-noguide has no guided distribution
    run = figures["runs"]["counting/0"]
    plain = {(p["method"], p["feedbacks"]): p["success_rate"] for p in fe.read_points(points)}
    assert (run["base_plain"], run["lora_plain"]) == (plain[("hero", 0)], plain[("hero", 8)])
    store = LocalStore(work / "default")
    runs = RunStore(store, "counting-hero-0")
    assert run["checkpoint"] == 1  # learned rounds 0 and 1: 8 feedbacks
    last = runs.load_stats(1)  # the pool: the best, and the good images besides a new best
    assert run["pool"] == last.good + (0 if last.new_best else 1)
    # the base model's rate on the run's guided noises, by hand: a fresh pipe that never had a LoRA
    tensors = load_tensors(store.get(f"{runs.checkpoint_prefix(1)}/{TENSORS}"))
    noise = guided_initial_noise(
        tensors["best.noise"], tensors["good_noises"], 4, best_ratio=0.5, eps=0.1,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert (HeroConfig().guidance.best_ratio, HeroConfig().guidance.noise_eps) == (0.5, 0.1)
    task = load_task("counting")
    expected = success_rate(
        load_configured_pipeline(ModelConfig()), task.prompts, task.target, 4, num_steps=2, batch_size=4,
        initial_noise=noise,
    )  # fmt: skip
    assert run["base_guided"] == expected.rate
    assert figures["cells"]["counting"]["seeds"] == 1

    # a second call keeps the runs it measured (same --at and --eval-images) and samples nothing again
    measured_rate, run["lora_guided"] = run["lora_guided"], 2.0
    results.write_text(json.dumps(figures))
    ge.main()
    assert json.loads(results.read_text())["cells"]["counting"]["lora_guided"] == 2.0
    # ... measured on the checkpoint there now: a run trained again is measured anew, and a kept run
    # the grid no longer holds at --at is dropped
    again = json.loads(results.read_text())
    again["runs"]["counting/0"]["checkpoint_sha256"] = "0" * 64
    again["runs"]["binding/0"] = {**again["runs"]["counting/0"], "lora_guided": 0.5}
    results.write_text(json.dumps(again))
    ge.main()
    remeasured = json.loads(results.read_text())
    assert list(remeasured["runs"]) == ["counting/0"]
    assert remeasured["runs"]["counting/0"]["lora_guided"] == measured_rate != 2.0
    # --report on a machine without the work folder: the kept runs' table, nothing sampled
    remeasured["runs"]["counting/0"]["lora_guided"] = 3.0
    results.write_text(json.dumps(remeasured))
    shutil.rmtree(work)
    monkeypatch.setattr(sys, "argv", [*argv, "--report"])
    ge.main()
    assert json.loads(results.read_text())["cells"]["counting"]["lora_guided"] == 3.0


@pytest.mark.long  # about five minutes (a compile on a CPU): make test-long (CI runs it)
def test_the_gpu_lease_script_rehearses_on_a_cpu_and_hands_back_each_benchmarks_files(tmp_path: Path) -> None:
    # the GPU lease comes once and is short: its script must not first fail there
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SIZE": "--arch tiny --images 2 --steps 2",
        "PYTHON": sys.executable,
    }
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_lease.sh"
    committed = (script.parent / "RESULTS.md").read_text()
    done = subprocess.run(
        ["bash", str(script), "all", str(out)],
        cwd=script.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # tagged with the device; in the order run: the figures never taken first
    names = ("gpu_round-fp16-cpu", "gpu_round-compiled-cpu", "gpu_round-baselines-cpu", "unet_step-cpu")
    for name in names:
        assert f"{name}: exit 0" in done.stdout, done.stdout[-3000:]
    # the device tool hands back at most 8 files: one log for all
    assert {path.name for path in out.iterdir()} == {"RESULTS.md", "lease.log", *(f"{n}.json" for n in names)}
    setups = {name: json.loads((out / f"{name}.json").read_text()) for name in names[:3]}
    assert [s["setup"] for s in setups["gpu_round-fp16-cpu"]["setups"]] == ["hero"]
    assert [s["setup"] for s in setups["gpu_round-compiled-cpu"]["setups"]] == ["hero-compiled"]
    assert [s["setup"] for s in setups["gpu_round-baselines-cpu"]["setups"]] == ["reference"]
    assert setups["gpu_round-baselines-cpu"]["diffusers"]["seconds"] > 0
    assert not any(figures["failed"] for figures in setups.values())
    log = (out / "lease.log").read_text()
    compiled = log[log.index("== gpu_round-compiled-cpu") : log.index("== gpu_round-baselines-cpu")]
    # said as each happens, so that a compile the lease cuts short still says how far it got
    for milestone in ("first sampling step done at", "first LoRA step done at"):
        assert f"round 0: {milestone}" in compiled
    assert "round 0 (warm-up):" in compiled
    assert "size mismatch" not in compiled  # no graph compiled again for another batch size
    written = (out / "RESULTS.md").read_text()
    assert all(f"<!-- begin {name} -->" in written for name in names)
    assert (script.parent / "RESULTS.md").read_text() == committed  # the checkout's results untouched

    # the budget cuts what does not fit: said, not started
    cut = subprocess.run(
        ["bash", str(script), "compiled", str(tmp_path / "cut")],
        cwd=script.parent.parent,
        env={**env, "BUDGET_S": "20"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cut.returncode == 1 and "gpu_round-compiled-cpu: not run (" in cut.stdout, cut.stdout + cut.stderr
