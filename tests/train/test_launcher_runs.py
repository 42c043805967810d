"""Two-process DeepSpeed runs of a tiny LLaMA on CPU, through launch.sh (the path users take)."""

import json

import pytest
from safetensors.torch import load_file

from train_support import launch, launched, metrics

pytestmark = pytest.mark.slow


def _losses(run_dir):
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_sift_run_learns_and_writes_outputs(make_config, stage):
    config = make_config(f"zero{stage}", train={"max_steps": 10}, deepspeed={
        "config": f"ds_configs/zero{stage}.json",
        "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {},
    })
    result = launched(config)
    assert result.leftover_shm == []  # DeepSpeed's 66 MiB-per-rank /dev/shm buffers are unlinked at exit
    run_dir = config.parent / f"zero{stage}"
    losses = _losses(run_dir)
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert any("eval_loss" in m for m in metrics(run_dir))
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["zero_stage"] == stage and summary["world_size"] == 2
    selection = json.loads((run_dir / "selection.json").read_text())
    adapter = load_file(str(run_dir / "adapter" / "sift_adapter.safetensors"))
    values = [t for k, t in adapter.items() if k.endswith(".values")]
    assert len(values) == 14 and all(v.abs().sum() > 0 for v in values)  # every matrix trained
    assert sum(v.numel() for v in values) == selection["selected"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000010"


def _final_tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "sift_adapter.safetensors"))


@pytest.mark.parametrize("kill_at, packing", [("after_step:3", False), ("during_save:4", False), ("after_step:3", True)])
def test_sigkill_then_resume_matches_an_uninterrupted_run(make_config, kill_at, packing):
    train = {"max_steps": 6, "save_every": 2, "keep_last": 2}
    data = {"packing": packing, "max_length": 64}
    reference = make_config("reference", train=train, data=data)
    launched(reference)

    interrupted = make_config("interrupted", train=train, data=data)
    killed = launch(interrupted, env={"SIFT_LLM_KILL_AT": kill_at})
    assert killed.returncode != 0
    run_dir = interrupted.parent / "interrupted"
    # A kill during the step-4 save leaves step 2 as the latest complete checkpoint.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    resumed = launched(interrupted, "--resume")
    assert "continuing from" in resumed.stdout + resumed.stderr

    expected, actual = _final_tensors(config_dir := reference.parent / "reference"), _final_tensors(run_dir)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] - actual[key]).abs().max() <= 1e-6, key
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == list(range(1, 7))
    assert _losses(run_dir) == pytest.approx(_losses(config_dir), abs=1e-5)
