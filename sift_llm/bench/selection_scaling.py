"""The selection pass alone: global vs per-matrix scope at each density, per version of the selection code.

Each version (``selection.versions``: a label and the checkout whose ``sift_llm`` is measured, e.g. a git
worktree of an older commit) runs in one process of its own, started as ``python <this file> --worker``
with that checkout first on ``sys.path``, so the algorithm of each version is compared on the same model,
the same calibration example and the same machine. The worker imports only what every version has
(``attach_sift``, ``SiftConfig``, ``handle.selector()``, ``Selector.observe`` / ``finalize``).

Per variant and round, on a fresh copy of the cost model (one process, ``threads`` torch threads, no
data parallelism): the wall time of the whole pass (forward, backward, scoring, finalize), the time spent
inside the selector (``observe`` + ``finalize``: what differs between versions and scopes), and the pass's
peak RSS over the RSS before it (the peak is reset with /proc/self/clear_refs). Rounds alternate the
variants' order. Through the trainer (2 ranks, global vs per-matrix) the cost part's ``sift_global_densities``
rows measure the same against the training step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def worker(request: dict, out: Path) -> None:
    """Run every variant for ``rounds`` rounds in this process (the package on sys.path is the one measured)."""
    import copy
    import gc
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from sift_llm import schema
    from sift_llm.sift import SiftConfig, attach_sift
    from sift_llm.sift import selection as selection_module

    torch.set_num_threads(request["threads"])
    base = AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=torch.float32)
    base.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, request["tokens"]), generator=generator)
    inside = {"observe": 0.0, "finalize": 0.0}
    for name in inside:
        original = getattr(selection_module.Selector, name)

        def timed(self, *args, _original=original, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                inside[_name] += time.perf_counter() - started

        setattr(selection_module.Selector, name, timed)
    variants = request["variants"]
    runs = []
    for round_index in range(request["rounds"]):
        order = variants if round_index % 2 == 0 else list(reversed(variants))
        for variant in order:
            model = copy.deepcopy(base)
            handle = attach_sift(model, schema.build(SiftConfig, {"density": variant["density"],
                                                                  "scope": variant["scope"]}))
            gc.collect()
            for name in inside:
                inside[name] = 0.0
            rss_before, _ = _rss()
            _reset_peak()
            started = time.perf_counter()
            selector = handle.selector()
            with selector.calibrating():
                model(input_ids=ids, labels=ids).loss.backward()
            report = selector.finalize()
            wall = time.perf_counter() - started
            _, peak = _rss()
            runs.append({**variant, "round": round_index + 1, "wall_s": wall, "observe_s": inside["observe"],
                         "finalize_s": inside["finalize"], "selector_s": inside["observe"] + inside["finalize"],
                         "rss_before_bytes": rss_before, "peak_rss_bytes": peak, "extra_rss_bytes": peak - rss_before,
                         "selected": report.selected, "grad_sq_share": report.grad_sq_share,
                         "load_average": round(os.getloadavg()[0], 2)})
            print(json.dumps(runs[-1]), flush=True)
            del model, handle, selector, report
            gc.collect()
    out.write_text(json.dumps(runs, indent=1))


def run_selection(cfg) -> dict:
    """The bench part: one worker process per version, then medians over rounds per (version, scope, density)."""
    from sift_llm.bench.common import median
    from sift_llm.bench.cost import build_model_dir, model_facts
    from sift_llm.bench.runs import REPO_ROOT
    from sift_llm.errors import UserError
    from sift_llm.runtime import log

    sel = cfg.selection
    model_dir = build_model_dir(sel.model, cfg.work / "models")
    facts = model_facts(model_dir)
    variants = [{"scope": scope, "density": density} for density in sel.densities for scope in sel.scopes]
    rows, versions = [], {}
    for label, checkout in sel.versions.items():
        root = (REPO_ROOT / checkout).resolve()
        if not (root / "sift_llm" / "sift" / "selection.py").is_file():
            raise UserError(f"selection.versions.{label}: {root} holds no sift_llm/sift/selection.py")
        rounds = sel.rounds_per_version.get(label, sel.rounds)
        request = {"model_dir": str(model_dir.resolve()), "tokens": sel.max_length, "threads": sel.threads, "rounds": rounds,
                   "variants": variants}
        out = (cfg.work / "selection" / f"{label}.json").resolve()  # the worker runs in the checkout
        out.parent.mkdir(parents=True, exist_ok=True)
        log(f"bench selection: version {label} ({root}), {rounds} round(s) of {len(variants)} variants")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "OMP_NUM_THREADS": str(sel.threads)}
        with open(out.with_suffix(".log"), "w") as handle:
            result = subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(request), str(out)], cwd=root,
                                    env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=7200)
        if result.returncode != 0:
            raise UserError(f"bench selection ({label}) failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
        runs = json.loads(out.read_text())
        versions[label] = {"checkout": str(root), "rounds": rounds, "runs": runs}
        for variant in variants:
            mine = [r for r in runs if r["scope"] == variant["scope"] and r["density"] == variant["density"]]
            rows.append({"version": label, **variant,
                         **{key: median(r[key] for r in mine) for key in
                            ("wall_s", "observe_s", "finalize_s", "selector_s", "extra_rss_bytes", "peak_rss_bytes")},
                         "round_wall_s": [r["wall_s"] for r in mine], "selected": mine[-1]["selected"],
                         "grad_sq_share": mine[-1]["grad_sq_share"]})
            log(f"  {label} {variant['scope']} {variant['density'] * 100:g}%: pass {rows[-1]['wall_s']:.2f} s, "
                f"selector {rows[-1]['selector_s']:.2f} s, +{rows[-1]['extra_rss_bytes'] / 2**20:.0f} MiB")
    return {"model": {"dir": str(model_dir), "parameters": facts["parameters"],
                      "targeted_entries": facts["targeted_entries"], "layers": sel.model.layers,
                      "hidden": sel.model.hidden, "intermediate": sel.model.intermediate},
            "tokens": sel.max_length, "threads": sel.threads, "rows": rows, "versions": versions}


def selection_section(part: dict) -> list[str]:
    model = part["model"]
    lines = [
        "### Selection pass: global vs per-matrix scope",
        "",
        f"The {model['parameters'] / 1e6:.0f}M cost model ({model['targeted_entries'] / 1e6:.0f}M targeted entries), "
        f"one calibration example of {part['tokens']} tokens, one process with {part['threads']} thread(s), a fresh "
        "copy of the model per variant, rounds alternated; medians over rounds. Pass: forward, backward, scoring "
        "and finalize; selector: the time inside the selector (observe + finalize); extra memory: the pass's peak "
        "RSS over the RSS before it. Versions: "
        + "; ".join(f"{label} = `{info['checkout']}` ({info['rounds']} round(s))" for label, info in part["versions"].items())
        + ".",
        "",
        "| version | scope | density | pass (s) | selector (s) | selector x per-matrix | extra memory | peak RSS | share of sum(g^2) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in part["rows"]:
        per_matrix = next((r for r in part["rows"] if r["version"] == row["version"] and r["density"] == row["density"]
                           and r["scope"] == "per_matrix"), None)
        times = f"{row['selector_s'] / per_matrix['selector_s']:.2f}" if per_matrix and per_matrix["selector_s"] else "–"
        lines.append(f"| {row['version']} | {row['scope']} | {row['density'] * 100:g}% | {row['wall_s']:.2f} | "
                     f"{row['selector_s']:.2f} | {times} | {row['extra_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['grad_sq_share'] * 100:.1f}% |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        # Not this file's folder (its modules' names, e.g. kernels, would shadow installed packages); the
        # checkout measured first (the bench puts it on PYTHONPATH); this file may live in another checkout.
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
        sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        worker(json.loads(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python selection_scaling.py --worker REQUEST_JSON OUT_JSON (run by `sift-llm bench --only selection`)")
