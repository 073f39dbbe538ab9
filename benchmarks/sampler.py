"""Trajectory sampling vs plain diffusers generation: same model, steps, batch, CFG, eta and noises.

Both are timed in one process, interleaved (plain, trajectory, plain, ...) after a warm-up, so that
drift of the machine hits both alike. overhead_ratio = median trajectory time / median plain time
(target: at most 1.10). On a GPU, peak memory and images/s are recorded too.

    python benchmarks/sampler.py                                  # CPU, tiny model -> sampler.json
    python benchmarks/sampler.py --arch sd15 --device cuda --dtype float16 --name sampler-gpu-sd15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_io import write_result

from hero_ml.diffusion.pipeline import DTYPES, load_pipeline
from hero_ml.diffusion.sampler import per_image_generators, sample_trajectories

TARGET_RATIO = 1.10


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one call, and the peak device memory it reached (GPU only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated()
    return time.perf_counter() - start, None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny", choices=["tiny", "sd15"], help="random-weight architecture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8, help="images per call (the reference: 8)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each method")
    parser.add_argument("--name", default="sampler", help="result name: results/<name>.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe = load_pipeline(f"random:{args.arch}", dtype=DTYPES[args.dtype], device=args.device)
    device = pipe.unet.device
    prompts = ["three red circles"] * args.batch
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def plain() -> object:
        return pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            eta=1.0,
            generator=per_image_generators(0, args.batch),
            output_type="pt",
        )

    def trajectory() -> object:
        return sample_trajectories(
            pipe,
            prompts,
            per_image_generators(0, args.batch),
            num_steps=args.steps,
            guidance_scale=args.cfg,
            eta=1.0,
            sub_batch_size=args.batch,
        )

    methods = {"plain_diffusers": plain, "trajectory": trajectory}
    for fn in methods.values():  # warm-up: allocator, kernels, lazy init
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    peaks: dict[str, list[int]] = {name: [] for name in methods}
    for repeat in range(args.repeats):
        for name, fn in methods.items():
            took, peak = timed(fn, device)
            seconds[name].append(took)
            if peak is not None:
                peaks[name].append(peak)
            print(f"repeat {repeat + 1}/{args.repeats} {name:16s} {took:.3f} s", flush=True)

    figures = {}
    for name in methods:
        median = statistics.median(seconds[name])
        figures[name] = {
            "seconds_median": round(median, 4),
            "seconds_min": round(min(seconds[name]), 4),
            "seconds_all": [round(s, 4) for s in seconds[name]],
            "images_per_s": round(args.batch / median, 3),
            "peak_memory_gib": round(max(peaks[name]) / 2**30, 3) if peaks[name] else None,
        }
    ratio = statistics.median(seconds["trajectory"]) / statistics.median(seconds["plain_diffusers"])
    ratio_min = min(seconds["trajectory"]) / min(seconds["plain_diffusers"])
    setup = {
        "arch": args.arch,
        "device": str(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "steps": args.steps,
        "cfg": args.cfg,
        "eta": 1.0,
        "resolution_px": size,
        "repeats": args.repeats,
    }
    rows = [
        "| method | median s | min s | images/s | peak GiB |",
        "|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        peak = f["peak_memory_gib"] if f["peak_memory_gib"] is not None else "—"
        rows.append(f"| {name} | {f['seconds_median']} | {f['seconds_min']} | {f['images_per_s']} | {peak} |")
    table = (
        f"## Sampler overhead — {args.arch}, {size} px, batch {args.batch}, {args.steps} DDIM steps, "
        f"CFG {args.cfg}, eta 1, {args.dtype} on {device}\n\n"
        + "\n".join(rows)
        + f"\n\n**overhead_ratio (trajectory / plain, medians): {ratio:.3f}** (of minima: {ratio_min:.3f}; "
        f"target ≤ {TARGET_RATIO})."
    )
    path = write_result(
        args.name,
        {
            "setup": setup,
            "methods": figures,
            "overhead_ratio": round(ratio, 4),
            "overhead_ratio_of_minima": round(ratio_min, 4),
            "target_ratio": TARGET_RATIO,
            "meets_target": ratio <= TARGET_RATIO,
        },
        table,
    )
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
