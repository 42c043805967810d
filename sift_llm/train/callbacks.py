"""Hooks attached to the training loop from outside: measurement for the bench, fault injection for tests.

The loop in :mod:`sift_llm.train.trainer` calls every callback at a few fixed points; a callback never
changes what is trained, only observes it (or, for the fault-injection tests, breaks it on purpose). Every
rank runs the same callbacks, so a callback may use collectives at any hook.

``sift-llm train`` attaches :func:`default_callbacks`: peak memory always, and from the environment the
bench's probes (``SIFT_LLM_COUNT_COLLECTIVES=1``) and the resume tests' faults (``SIFT_LLM_KILL_AT``,
``SIFT_LLM_NAN_GRAD_AT``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

import torch

from sift_llm.runtime import world_size
from sift_llm.train.metrics import COLLECTIVES, peak_memory, reset_peak_memory

if TYPE_CHECKING:
    from sift_llm.train.trainer import Trainer


class Callback:
    """No-op hooks; subclasses override what they need. ``record`` and ``summary`` may be extended."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After every setup step, before the selection, the resume and the loop."""

    def on_selection_start(self, trainer: Trainer) -> None:
        """Before SIFT's calibration passes."""

    def on_selection_end(self, trainer: Trainer, report: dict[str, Any]) -> None:
        """After the selection is fixed; ``report`` becomes selection.json."""

    def on_loop_start(self, trainer: Trainer) -> None:
        """Right before the first training step of this process (after the step-0 evaluation)."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        """Before optimizer step ``step`` (1-based) runs its micro-batches."""

    def on_gradients_ready(self, trainer: Trainer, step: int) -> None:
        """The step's gradients are accumulated and reduced; the update has not run yet."""

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        """After the optimizer update of ``step``, before its evaluation and checkpoint; ``record`` is its metrics line."""

    def on_checkpoint_written(self, trainer: Trainer, step: int) -> None:
        """Every rank has written its part of checkpoint ``step``, which is not yet committed."""

    def on_after_checkpoint(self, trainer: Trainer, step: int) -> None:
        """The end of step ``step``'s work (after its evaluation and checkpoint, if any)."""

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After the last step, before the export; ``summary`` becomes train_summary.json."""


class CallbackList:
    """Fans every hook out to each callback in order: ``callbacks.on_step_end(trainer, step, record)``."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_") or not hasattr(Callback, hook):
            raise AttributeError(hook)

        def fan_out(*args) -> None:
            for callback in self.callbacks:
                getattr(callback, hook)(*args)

        return fan_out


def _per_rank(record: dict) -> dict:
    """{key: [value on rank 0, rank 1, ...]} for a dict every rank passes."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return {key: [value] for key, value in record.items()}
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, record)
    return {key: [entry.get(key) for entry in gathered] for key in record}


class PeakMemory(Callback):
    """Each rank's peak memory (RSS; CUDA max allocated) during the selection and during the training steps.

    The steps' peak is read at the end of each step, before its evaluation or checkpoint, so it measures
    weights, optimizer state and activations of training alone.
    """

    def __init__(self) -> None:
        self.loop_peak: dict | None = None

    def on_selection_start(self, trainer: Trainer) -> None:
        reset_peak_memory(trainer.device)
        self._selection_started = time.perf_counter()

    def on_selection_end(self, trainer: Trainer, report: dict[str, Any]) -> None:
        report["wall_seconds"] = time.perf_counter() - self._selection_started
        report["peak_memory"] = _per_rank(peak_memory(trainer.device))

    def on_loop_start(self, trainer: Trainer) -> None:
        reset_peak_memory(trainer.device)
        self.loop_peak = peak_memory(trainer.device)

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        self.loop_peak = peak_memory(trainer.device)

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        summary["peak_memory"] = _per_rank(self.loop_peak or peak_memory(trainer.device))


class StepCpuTime(Callback):
    """This process's CPU seconds per step (``step_cpu_s``): robust to a machine busy with other work."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self._started = time.process_time()

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        record["step_cpu_s"] = time.process_time() - self._started


class CollectiveBytes(Callback):
    """Bytes handed to torch.distributed collectives per step (``collective_bytes``), for the bench.

    Construct it before DeepSpeed initialises its communication backend: it wraps torch.distributed's
    collectives, and DeepSpeed keeps references to some of them.
    """

    def __init__(self) -> None:
        COLLECTIVES.install(force=True)

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        COLLECTIVES.start_step()

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        counted = COLLECTIVES.end_step()
        if counted is not None:
            record["collective_bytes"] = counted


class KillAt(Callback):
    """Die abruptly, as a crash or SIGKILL would, at ``after_step:N`` (after step N's checkpoint, if due)
    or ``during_save:N`` (every rank has written checkpoint N, none has committed it)."""

    def __init__(self, spec: str) -> None:
        point, _, step = spec.partition(":")
        if point not in ("after_step", "during_save") or not step.isdigit():
            raise ValueError(f"SIFT_LLM_KILL_AT must look like after_step:N or during_save:N, got {spec!r}")
        self.point, self.step = point, int(step)

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint_written(self, trainer: Trainer, step: int) -> None:
        if self.point == "during_save" and step == self.step:
            self._die()

    def on_after_checkpoint(self, trainer: Trainer, step: int) -> None:
        if self.point == "after_step" and step == self.step:
            self._die()


class NanGradientAt(Callback):
    """Make every gradient of step ``step`` NaN while its loss stays finite (a poisoned backward).

    A backward hook on the model's output logits multiplies their gradient by NaN, so every trainable
    parameter's gradient in that step is NaN.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._handle = None

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        if step != self.step:
            return

        def poison(module, inputs, output):
            logits = output.logits if hasattr(output, "logits") else output
            if logits.requires_grad:
                logits.register_hook(lambda grad: grad * float("nan"))

        self._handle = trainer.engine.module.register_forward_hook(poison)

    def on_step_end(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def default_callbacks(environ: dict[str, str] | None = None) -> list[Callback]:
    """What ``sift-llm train`` attaches: peak memory and CPU time always; probes and faults on request."""
    environ = os.environ if environ is None else environ
    callbacks: list[Callback] = [PeakMemory(), StepCpuTime()]
    if environ.get("SIFT_LLM_COUNT_COLLECTIVES") == "1":
        callbacks.append(CollectiveBytes())
    if environ.get("SIFT_LLM_KILL_AT"):
        callbacks.append(KillAt(environ["SIFT_LLM_KILL_AT"]))
    if environ.get("SIFT_LLM_NAN_GRAD_AT"):
        callbacks.append(NanGradientAt(int(environ["SIFT_LLM_NAN_GRAD_AT"])))
    return callbacks
