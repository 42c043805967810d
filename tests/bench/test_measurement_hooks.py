"""The trainer's measurement hooks: peak-memory windows and the collective byte counter."""

from __future__ import annotations

import torch

from sift_llm.train.metrics import CollectiveCounter, peak_memory, reset_peak_memory

CPU = torch.device("cpu")


def test_peak_memory_window_resets():
    reset_peak_memory(CPU)
    baseline = peak_memory(CPU)["rss_peak_bytes"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = peak_memory(CPU)["rss_peak_bytes"]
    assert grown >= baseline + 48 * 2**20
    del block
    reset_peak_memory(CPU)
    assert peak_memory(CPU)["rss_peak_bytes"] < grown


def test_counter_counts_payloads_only_inside_a_step(monkeypatch):
    calls = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        calls.append(tensor)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        calls.append(tensor)

    counter = CollectiveCounter()
    counter.installed = True
    reduce = counter._wrap("all_reduce", all_reduce, "tensor", 0)
    gather = counter._wrap("all_gather", all_gather, "tensor_list", 0)

    reduce(torch.zeros(10))  # outside a step: not counted
    counter.start_step()
    reduce(torch.zeros(10))
    reduce(tensor=torch.zeros(5, dtype=torch.float64))
    gather([torch.zeros(3), torch.zeros(3)], torch.zeros(3))
    with counter.paused():
        reduce(torch.zeros(100))  # bookkeeping: not counted
    counts = counter.end_step()
    assert counts == {"all_reduce": 10 * 4 + 5 * 8, "all_gather": 6 * 4}
    assert len(calls) == 5  # every call still reaches the real collective


def test_counter_is_off_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv("SIFT_LLM_COUNT_COLLECTIVES", raising=False)
    counter = CollectiveCounter()
    original = torch.distributed.all_reduce
    counter.install()
    assert torch.distributed.all_reduce is original
    counter.start_step()
    assert counter.end_step() is None


def test_rank_peaks_are_the_trainer_processes_the_launcher_started():
    from sift_llm.bench.runs import RssSampler

    sampler = RssSampler(pid=1, interval=1.0)
    rank = "/venv/bin/python -u -m sift_llm.cli train run/bench_config.yaml"
    sampler.peaks = {
        1: {"pid": 1, "parent": None, "command": "bash launch.sh run/bench_config.yaml", "peak_rss_bytes": 5},
        10: {"pid": 10, "parent": 1, "command": "python -u -m deepspeed.launcher.launch --world_info=x",
             "peak_rss_bytes": 50},
        12: {"pid": 12, "parent": 10, "command": rank, "peak_rss_bytes": 700},
        11: {"pid": 11, "parent": 10, "command": rank, "peak_rss_bytes": 600},
        13: {"pid": 13, "parent": 10, "command": "lscpu", "peak_rss_bytes": 3},  # a tool the launcher ran
        14: {"pid": 14, "parent": 11, "command": rank, "peak_rss_bytes": 100},  # a rank's own forked helper
    }
    assert sampler.rank_peaks() == [600, 700]
