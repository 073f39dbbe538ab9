"""The flow of the GPU-pool test: it records which GPU its worker gave it (CUDA_VISIBLE_DEVICES) and
when it ran, into OUT, standing in for a training run that holds a GPU for a while."""

import json
import os
import time
from pathlib import Path

from prefect import flow


@flow(name="gpu-pool-probe")
def probe(out: str, seconds: float = 4.0) -> None:
    started = time.time()
    time.sleep(seconds)
    record = {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": started, "ended": time.time()}
    Path(out).write_text(json.dumps(record))
