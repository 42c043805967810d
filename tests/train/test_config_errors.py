import pytest

from sift_llm.cli import main
from sift_llm.config import ExperimentConfig, load_config, save_resolved
from sift_llm.schema import ConfigError
from sift_llm.train.ds_config import build_ds_config


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_unknown_key_suggests_the_nearest_valid_key(tmp_path):
    path = write(tmp_path, "train:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'\?"):
        load_config(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("train:\n  micro_batch_size: two\n", r"train.micro_batch_size: got 'two', expected an integer"),
        ("train:\n  warmup_ratio: 1.5\n", r"train.warmup_ratio: 1.5 is out of range, allowed \[0, 1\]"),
        ("method:\n  sift:\n    density: 0\n", r"method.sift.density: 0.0 is out of range, allowed \(0, 1\]"),
        ("method:\n  name: sparse\n", r"method.name: got 'sparse', expected one of 'sift', 'full', 'lora'"),
        ("data:\n  max_length: [1]\n", r"data.max_length: got \[1\], expected an integer"),
        ("train: [1, 2]\n", r"train: expected a mapping"),
        ("train:\n  epochs: 1\n bad: [\n", r"exp.yaml:\d+: invalid YAML"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path, "method:\n  name: sift\n")
    cfg = load_config(path, ["method.sift.density=0.05", "train.max_steps=3", "method.sift.targets=[q_proj]"])
    assert cfg.method.sift.density == 0.05 and cfg.train.max_steps == 3 and cfg.method.sift.targets == ["q_proj"]
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(path, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\ntrain:\n  learning_rate: 0.001\n"))
    saved = save_resolved(cfg, tmp_path / "run")
    assert load_config(saved) == cfg
    assert isinstance(cfg, ExperimentConfig) and "learning_rate: 0.001" in saved.read_text()


def test_deepspeed_json_that_contradicts_the_experiment_is_an_error(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}')
    cfg = load_config(write(tmp_path, f"deepspeed:\n  config: {ds}\ntrain:\n  micro_batch_size: 4\n"))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 but the experiment config's train.micro_batch_size gives 4"):
        build_ds_config(cfg, bf16=False, world_size=1)
    filled = build_ds_config(load_config(write(tmp_path, "train:\n  micro_batch_size: 4\n  gradient_accumulation_steps: 2\n")),
                             bf16=True, world_size=2)
    assert filled["train_batch_size"] == 16 and filled["bf16"]["enabled"] is True
    assert filled["gradient_clipping"] == 1.0


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    path = write(tmp_path, "modle:\n  path: x\n")
    assert main(["train", str(path)]) == 2
    assert "unknown key 'modle'; did you mean 'model'?" in capsys.readouterr().err


def test_overrides_may_follow_the_options():
    from sift_llm.cli import parse

    args = parse(["bench", "b.yaml", "--only", "memory", "memory.steps=3", "--output", "out", "selection.rounds=1"])
    assert (args.config, args.only, args.output) == ("b.yaml", "memory", "out")
    assert args.overrides == ["memory.steps=3", "selection.rounds=1"]
    assert parse(["bench", "b.yaml", "cost.rounds=2", "--only", "cost"]).overrides == ["cost.rounds=2"]
    with pytest.raises(SystemExit):
        parse(["bench", "b.yaml", "--only", "memory", "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse(["report", "run_a", "--output", "o", "x.y=1"])  # report takes no overrides
