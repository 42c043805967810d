"""Several nodes through the deepspeed launcher, simulated on this machine: two launch.sh invocations with a
two-host hostfile (one CPU rank each, --no_ssh, --node_rank 0|1) train exactly what one node with two ranks
trains, also when the nodes do not share a dataset cache; a resume with another rank count is refused."""

from __future__ import annotations

import os
import subprocess

import pytest
from safetensors.torch import load_file

from train_support import REPO, free_port, launch, launched, remove_shm_buffers

pytestmark = pytest.mark.slow


def _tensors(run_dir):
    return load_file(str(run_dir / "adapter" / "sift_adapter.safetensors"))


def test_two_nodes_train_what_one_node_with_two_ranks_trains(make_config, tmp_path):
    train = {"max_steps": 4, "save_every": 2}
    one_node = make_config("one-node", train=train)
    launched(one_node)

    # No data.output_dir: each "node" builds the dataset into its own cache, as nodes without shared storage do.
    two_nodes = make_config("two-nodes", train=train, data={"output_dir": None})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = []
    for node in range(2):
        command = ["bash", str(REPO / "launch.sh"), str(two_nodes), "--hostfile", str(hostfile), "--num_nodes", "2",
                   "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, "--no_ssh"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SIFT_LLM_CACHE": str(tmp_path / f"cache-node{node}")}
        nodes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    remove_shm_buffers(int(port))
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    assert "2 rank(s)" in outputs[0]
    for node in range(2):  # each node built the dataset itself, to the same fingerprint
        assert len(list((tmp_path / f"cache-node{node}" / "datasets").iterdir())) == 1
    assert [p.name for p in (tmp_path / "cache-node0" / "datasets").iterdir()] == \
        [p.name for p in (tmp_path / "cache-node1" / "datasets").iterdir()]

    expected, actual = _tensors(one_node.parent / "one-node"), _tensors(two_nodes.parent / "two-nodes")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] - actual[key]).abs().max() <= 1e-6, key


def test_resuming_with_another_number_of_ranks_is_refused_naming_both(make_config):
    config = make_config("regrow", train={"max_steps": 2})
    launched(config)
    result = launch(config, "--resume", "train.max_steps=4", ranks=1)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "was written by 2 ranks and this run has 1" in output, output[-3000:]
    assert "Traceback" not in output
