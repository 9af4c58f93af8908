"""The service's defaults for torch's OpenMP runtime, set before torch is imported.

torch's CPU build runs its intra-op parallel regions on GNU OpenMP (libgomp), whose
threads spin-wait for the next region (about 300,000 spins, a few ms) before they
sleep. On an idle machine that saves a wake-up; beside another busy process it is a
collapse: a thread spinning on a core the neighbour wants delays the region's slowest
thread, so every region waits a scheduler slice. Measured in process on 2 shared cores
with one other busy process: a PINN trace (2 intra-op threads) 37 ms idle took 330 ms
with libgomp's defaults and 40 ms with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at
once). End to end through the server (``make bench-contention``, bench/contention.py)
the neighbours measured so far slowed both settings alike (within the machine's noise),
and PASSIVE cost nothing measurable idle: a default that removes the worst case and
costs nothing otherwise.

libgomp reads its environment once, when it is loaded (``import torch``), so the
defaults must be in ``os.environ`` before that: ``hessian_service.main`` applies them
first thing, and the launchers (``hessian-service serve``, ``local_server``, the
Dockerfile) put them in the server's environment. A value the user set always wins.

This module imports nothing but the standard library (and never torch).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

logger = logging.getLogger("hessian_service")

# libgomp: PASSIVE = a waiting thread sleeps at once (its spin count becomes 0).
COMPUTE_ENV_DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def with_compute_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus every default it does not set (the caller's values win)."""
    return {**COMPUTE_ENV_DEFAULTS, **env}


def apply_compute_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Put the defaults this process lacks into ``environ`` (``os.environ``) while torch is
    not imported yet; the names set. Once torch is imported libgomp has read its
    environment already: then nothing is set and a warning names what cannot apply."""
    target = os.environ if environ is None else environ
    missing = [key for key in COMPUTE_ENV_DEFAULTS if key not in target]
    if not missing:
        return []
    if "torch" in sys.modules:
        logger.warning(
            "torch was imported before hessian_service.main: the OpenMP defaults %s cannot "
            "take effect in this process (set them in its environment to apply them)",
            {key: COMPUTE_ENV_DEFAULTS[key] for key in missing},
        )
        return []
    for key in missing:
        target[key] = COMPUTE_ENV_DEFAULTS[key]
    return missing
