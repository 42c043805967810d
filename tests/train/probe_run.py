"""Run the trainer with probe callbacks and write what they saw as JSON (one process, or under torchrun).

    python tests/train/probe_run.py CONFIG OUT_JSON [--resume] [--poison-padding] [section.key=value ...]

Per step, on every rank: whether the model was in training mode at each micro-batch's forward, how often
each decoder layer's MLP ran its forward (twice per micro-batch when activations are recomputed), and the
step's accumulated gradient of every trainable tensor (DeepSpeed's reduced, full gradient, taken after
the last micro-batch's backward and before the update). Rank 0 writes OUT_JSON.

``--poison-padding`` writes NaN into the padding at the end of each ZeRO-3 partition of the trainable
tensors after every update (what ``torch.empty`` may leave there) and records how many elements it wrote.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    from deepspeed.utils import safe_get_full_grad

    from sift_llm.config import load_config
    from sift_llm.train.callbacks import Callback
    from sift_llm.train.trainer import Trainer, end_process

    config, out, *rest = argv
    resume = "--resume" in rest
    poison = "--poison-padding" in rest
    overrides = [a for a in rest if a not in ("--resume", "--poison-padding")]

    class Probe(Callback):
        def __init__(self):
            self.steps = []

        def on_train_start(self, trainer):
            module = trainer.engine.module
            core = getattr(module, "get_base_model", lambda: module)()
            self.layers = list(core.model.layers)
            for index, layer in enumerate(self.layers):
                # transformers checkpoints a layer's forward (not its __call__): hook a module inside it.
                layer.mlp.register_forward_pre_hook(lambda m, a, i=index: self.calls.update([i]))
            module.register_forward_pre_hook(lambda m, a, kw: self.modes.append(m.training), with_kwargs=True)
            self.calls, self.modes = Counter(), []

        def on_step_start(self, trainer, step):
            self.calls, self.modes = Counter(), []

        def on_gradients_ready(self, trainer, step):
            named = trainer.method.trainable(trainer.engine.module)
            self.grads = {name: safe_get_full_grad(p).detach().float().cpu().tolist() for name, p in named}

        def on_step_end(self, trainer, step, record):
            poisoned = self.poison_padding(trainer) if poison else 0
            self.steps.append({
                "poisoned_padding": poisoned,
                "step": step, "training": list(self.modes), "layer_calls": [self.calls[i] for i in range(len(self.layers))],
                "micro_batches": trainer.accumulation, "loss": record["loss"], "grads": self.grads,
            })

        @staticmethod
        def poison_padding(trainer):
            """NaN into each partition's tail past the parameter's own elements; the count written (this rank)."""
            from sift_llm.train.methods import local_elements

            written = 0
            for _, param in trainer.method.trainable(trainer.engine.module):
                partition = getattr(param, "ds_tensor", None)
                if partition is not None:
                    own = local_elements(param).numel()
                    partition.narrow(0, own, partition.numel() - own).fill_(float("nan"))
                    written += partition.numel() - own
            return trainer._per_rank(written)

    probe = Probe()
    Trainer(load_config(config, overrides), resume=resume or None, callbacks=[probe]).run()
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps({"steps": probe.steps}))
    end_process(0)  # as `sift-llm train` does: a normal interpreter exit can abort with gloo alive
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
