"""What every benchmark records: the command, the machine, the date, its figures, and its table.

Each benchmark writes benchmarks/results/<name>.json and replaces its own section of
benchmarks/RESULTS.md (between `<!-- begin <name> -->` and `<!-- end <name> -->`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
# elsewhere for a rehearsal (benchmarks/gpu_lease.sh on a CPU) that must leave the committed results be
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", HERE / "results"))
RESULTS_MD = Path(os.environ.get("BENCH_RESULTS_MD", HERE / "RESULTS.md"))


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def command() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_result(name: str, figures: dict[str, Any], table: str) -> Path:
    """Save <name>.json (command, machine, date, figures) and the table in RESULTS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "command": command(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **figures,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")

    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = f"{begin}\n{table.strip()}\n\nCommand: `{record['command']}` — {record['date']}, "
    hardware = record["machine"].get("gpu") or record["machine"]["cpu"]
    section += f"{hardware}. Raw: `results/{name}.json`.\n{end}"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)
    return path
