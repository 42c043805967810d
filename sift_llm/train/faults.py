"""Fault injection for the resume tests: die abruptly at a named point, as a crash or SIGKILL would.

``SIFT_LLM_KILL_AT=after_step:3`` kills every rank right after optimizer step 3 completes (after its
checkpoint, if one is due); ``during_save:4`` kills midway through writing the step-4 checkpoint.
"""

from __future__ import annotations

import os
import signal


def maybe_die(point: str, step: int) -> None:
    if os.environ.get("SIFT_LLM_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
