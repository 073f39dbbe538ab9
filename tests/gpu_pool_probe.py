"""The flow of the GPU-pool test: it records which GPUs its worker gave it (CUDA_VISIBLE_DEVICES), the
processes and device a training run there would take (its config) and when it ran, into OUT,
standing in for a training run that holds its GPUs for a while."""

import json
import os
import time
from pathlib import Path

from prefect import flow

from hero_ml.config import load_config


@flow(name="gpu-pool-probe")
def probe(out: str, seconds: float = 4.0) -> None:
    started = time.time()
    time.sleep(seconds)
    model = load_config().model
    record = {
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "processes": model.processes,
        "device": model.device,
        "started": started,
        "ended": time.time(),
    }
    Path(out).write_text(json.dumps(record))
