"""Fault injection for the crash-resume tests: a real SIGKILL at a named point.

    OPD_FAULT=scored.part:2 opd run ...   # killed right after the 2nd scored part is committed

Points: rollout.part, scored.part (after a part is committed), train.step (after an optimizer
step, before the checkpoint is committed), eval (before the eval manifest), manifest (a manifest's
temporary file is written but not yet renamed). Unset, this costs one dict lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get("OPD_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
