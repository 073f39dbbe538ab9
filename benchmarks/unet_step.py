"""One guided UNet call at a round's sub-batch, variant by variant: where does sampling time go?

Sampling is 50 of these calls per sub-batch, so its speed is this call's speed. Each variant changes
one thing against an earlier one (dtype, memory format, the LoRA, TF32 for the LoRA's float32
matmuls, the LoRA's matmuls in half precision under autocast), all on one SD 1.5-shaped UNet with
random weights, timed with CUDA events (median of
--repeats calls after warm-up). FLOPs are counted from the model as in gpu_round.py.

    python benchmarks/unet_step.py --device cuda                 # -> results/unet_step.json
    python benchmarks/unet_step.py --arch tiny --device cpu --batch 2 --repeats 2 --name unet_step-cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

sys.path.insert(0, str(Path(__file__).parent))
from gpu_round import BF16_PEAK_TFLOPS, unet_flops
from results_io import write_result

from hero_ml.diffusion.lora import add_lora
from hero_ml.diffusion.pipeline import load_pipeline
from hero_ml.diffusion.sampler import guided_noise_pred

# (name, base dtype, channels_last, LoRA dtype or None, tf32, LoRA compute): each row differs from an
# earlier one in one thing. The LoRA is float32 in training (its master weights); the bf16 row asks
# what sampling would gain from a bf16 copy of it. LoRA compute "cast" is peft's way (the input cast
# to the LoRA's float32); "autocast" runs the call under torch.autocast (the LoRA's matmuls in half
# precision from its float32 masters, as mixed-precision training does); "autocast, no input cast"
# also skips peft's cast of the input to float32 and back.
VARIANTS = (
    ("fp16", torch.float16, False, None, False, "cast"),
    ("bf16", torch.bfloat16, False, None, False, "cast"),
    ("bf16 channels-last", torch.bfloat16, True, None, False, "cast"),
    ("bf16 + LoRA (fp32)", torch.bfloat16, False, torch.float32, False, "cast"),
    ("bf16 + LoRA + TF32", torch.bfloat16, False, torch.float32, True, "cast"),
    ("bf16 + LoRA (bf16)", torch.bfloat16, False, torch.bfloat16, False, "cast"),
    ("bf16 channels-last + LoRA (fp32)", torch.bfloat16, True, torch.float32, False, "cast"),
    ("fp16 + LoRA (fp32)", torch.float16, False, torch.float32, False, "cast"),
    ("fp16 + LoRA (fp32) under autocast", torch.float16, False, torch.float32, False, "autocast"),
    (
        "fp16 + LoRA (fp32) under autocast, no input cast",
        torch.float16,
        False,
        torch.float32,
        False,
        "autocast, no input cast",
    ),
)


def apply_variant(
    unet: torch.nn.Module, dtype: torch.dtype, lora_dtype: torch.dtype | None, channels_last: bool
) -> None:
    """The frozen weights to dtype, the LoRA's (the trainable ones) to lora_dtype, and the layout."""
    for parameter in unet.parameters():
        parameter.data = parameter.data.to(lora_dtype if parameter.requires_grad else dtype)
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@contextmanager
def lora_compute(
    unet: torch.nn.Module, mode: str, dtype: torch.dtype, device: torch.device
) -> Iterator[None]:
    """The variant's way of computing the LoRA (see VARIANTS); float32 runs without autocast."""
    with ExitStack() as stack:
        if mode != "cast" and dtype != torch.float32:
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if mode == "autocast, no input cast":
            stack.enter_context(disable_input_dtype_casting(unet))
        yield


def time_call(call, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of call() (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64, help="images in the call (2x rows with CFG)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="unet_step")
    args = parser.parse_args()

    device = torch.device(args.device)
    pipe = load_pipeline(f"random:{args.arch}", dtype=torch.float32, device=device)
    unet, config = pipe.unet, pipe.unet.config
    unet.requires_grad_(False)
    flops = unet_flops(pipe, args.guidance_scale, backward=False) * args.batch
    peak = (
        next((p for k, p in BF16_PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
        if (device.type == "cuda")
        else None
    )
    shape = (args.batch, config.in_channels, config.sample_size, config.sample_size)
    width = pipe.text_encoder.config.hidden_size
    states = torch.randn(args.batch, pipe.tokenizer.model_max_length, width, device=device)
    sample = torch.randn(shape, device=device)
    timesteps = torch.full((args.batch,), 500, device=device)

    rows = []
    has_lora = False
    for name, dtype, channels_last, lora_dtype, tf32, compute in VARIANTS:
        if device.type == "cpu":  # a CPU has no fast half precision: the variants differ in the rest
            dtype, lora_dtype = torch.float32, torch.float32 if lora_dtype else None
        if lora_dtype and not has_lora:  # attached once: the later variants all carry it
            add_lora(unet, rank=args.lora_rank, alpha=args.lora_rank)
            has_lora = True
        apply_variant(unet, dtype, lora_dtype, channels_last)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        embeds = states.to(dtype)

        call = partial(guided_noise_pred, unet, sample, timesteps, embeds, embeds, args.guidance_scale)
        with torch.no_grad(), lora_compute(unet, compute, dtype, device):
            seconds = time_call(call, device, args.warmup, args.repeats)
        achieved = flops / seconds / 1e12
        rows.append(
            {
                "variant": name,
                "seconds": round(seconds, 4),
                "images_per_s": round(args.batch / seconds, 1),
                "tflops": round(achieved, 1),
                "share_of_bf16_peak": round(achieved / peak, 3) if peak else None,
            }
        )
        print(rows[-1], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False

    base = rows[0]["seconds"]
    lines = [
        f"### One guided UNet call ({args.arch}, {args.batch} images = {2 * args.batch} rows, CFG) "
        "by variant",
        "",
        f"FLOPs counted from the model: {flops / 1e12:.2f} TFLOP a call. Median of {args.repeats} calls "
        f"after {args.warmup} warm-ups. A round's sampling is one such call per DDIM step and sub-batch.",
        "",
        "| variant | ms a call | images/s | TFLOP/s | share of bf16 peak | time / fp16 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["share_of_bf16_peak"] if r["share_of_bf16_peak"] is not None else "—"
        lines.append(
            f"| {r['variant']} | {r['seconds'] * 1e3:.1f} | {r['images_per_s']} | {r['tflops']} | {share} "
            f"| {r['seconds'] / base:.2f}x |"
        )
    write_result(
        args.name,
        {
            "arch": args.arch,
            "batch": args.batch,
            "flops_per_call": flops,
            "bf16_peak_tflops": peak,
            "variants": rows,
        },
        "\n".join(lines),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
