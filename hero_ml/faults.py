"""Crash points: named places where a fault-injection test makes the process die as a crash would.

`HERO_CRASH_AT=<point>[:<n>]` makes the process SIGKILL itself the n-th time (default: the first) it
passes <point>; nothing is flushed, closed or cleaned up, as with a power cut or an OOM kill. Unset (every
real run), a crash point is one environment lookup. tests/test_crash_safety.py kills `hero run` at each
point and checks that the resumed run ends as an uninterrupted one (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

CRASH_ENV = "HERO_CRASH_AT"

# Every crash point, in the order a round passes them.
POINTS = {
    "sampling": "after a denoising step (n: which step of the round)",
    "commit.images": "after an image of the round is stored, before the manifest (n: which image)",
    "commit.manifest": "with every file of the round stored, before its manifest commits it",
    "publish": "after some of a round's Label Studio tasks are imported (n: which import call)",
    "collect": "after a round's raw annotations are stored, before its feedback is",
    "feedback": "after the round's feedback is stored, before learning",
    "encoder": "after the encoder's update, before DDPO's",
    "ddpo.step": "after an optimiser step of the LoRA (n: which step of the round)",
    "checkpoint.tensors": "after the checkpoint's tensors are written, before state.json commits them",
    "checkpoint.progress": "after the checkpoint is committed, before progress.json points at it",
    "track": "after the round's metrics are logged, before its image grid",
}

_passed: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """Die here (SIGKILL) if HERO_CRASH_AT names this point and this is its n-th pass."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{CRASH_ENV}={spec!r} names no crash point; the points are {sorted(POINTS)}")
    if point != name:
        return
    _passed[name] += 1
    if _passed[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
