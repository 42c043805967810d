"""bench.md (tables, targets with measured ratios) and bench.png (the chart) from a bench.json."""

from __future__ import annotations

import json
from pathlib import Path

from sift_llm.bench.targets import (
    baselines,
    cost_rows_with_state,
    evaluate,
    gathered_bytes,
    peak,
    ratio,
    recovery,
    reduced_bytes,
    selection_ratio,
    step_ratio,
)
from sift_llm.fsio import atomic_write_text



def _f(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not digits:
        return f"{value:,}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _count(value) -> str:
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return str(int(value))


def _bytes(value) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def cost_section(cost: dict) -> list[str]:
    rows = cost["rows"]
    lora, full = baselines(rows)
    model = cost["model"]
    state = {row["label"]: row for row in (cost.get("state_probe") or {}).get("rows", [])}
    memory_name = "CUDA max allocated" if cost.get("device_type") == "cuda" else "peak RSS (largest rank)"
    lines = [
        "### Cost: one training step through the trainer",
        "",
        f"Random LLaMA-shaped model, {model['parameters'] / 1e6:.0f}M parameters ({model['layers']} layers, hidden "
        f"{model['hidden']}, MLP {model['intermediate']}, {model['heads']} heads; {model['targeted_entries'] / 1e6:.0f}M "
        f"entries in the q/k/v/o/gate/up/down matrices). {cost['ranks']} ranks through `launch.sh` and DeepSpeed "
        f"(`{cost['deepspeed_config']}`), micro-batch {cost['micro_batch_size']} x {cost['max_length']} tokens per rank, "
        f"fp32. Step time: median of {cost['timed_steps']} steps after {cost['warmup_steps']} warm-up steps, pooled "
        f"over {cost['rounds']} round(s) of all methods (alternated, odd rounds reversed); the x LoRA / x full "
        "columns are the median over rounds of each round's ratio, so load from other work on the machine, which "
        f"changes over minutes, cancels within a round. Memory: {memory_name} over "
        "the training steps (weights, optimizer state, activations; the process baseline of Python, torch and "
        "DeepSpeed included). CPU s/step: rank 0's process CPU time per step, which a busy machine inflates less "
        "than wall time. Bytes per step: payload handed to torch.distributed collectives on one rank.",
        "",
    ]
    header = ["method", "trainable", "peak memory", "x LoRA", "x full", "step time (s)", "x LoRA", "x full",
              "CPU s/step", "x LoRA", "tokens/s", "all-reduce B/step", "/ (4 B x trainable)", "all-gather B/step", "state B/entry"]
    table = []
    for row in rows:
        mem = peak(row)
        reduced = reduced_bytes(row)
        probe = state.get(row["label"])
        table.append([
            row["label"], _count(row.get("trainable")), _bytes(mem),
            _f(ratio(mem, peak(lora))), _f(ratio(mem, peak(full))),
            _f(row["step_time_s"], 3), _f(step_ratio(row, lora)), _f(step_ratio(row, full)),
            _f(row.get("step_cpu_s"), 3), _f(ratio(row.get("step_cpu_s"), lora.get("step_cpu_s") if lora else None)),
            _f(row.get("tokens_per_s"), 0), _bytes(reduced),
            _f(ratio(reduced, 4 * row["trainable"]) if row.get("trainable") else None, 3),
            _bytes(gathered_bytes(row)),
            _f(probe["state_bytes_per_trainable"], 1) if probe else "–",
        ])
    lines += _table(header, table)
    baseline = cost.get("process_baseline_rss_bytes")
    if baseline and full and cost.get("device_type") != "cuda":
        net = [f"{row['label']} {ratio(peak(row) - baseline, peak(full) - baseline):.2f}x"
               for row in rows if row["method"] != "full" and not row.get("before")]
        lines += ["", f"An idle process with a rank's imports (torch, DeepSpeed, transformers, PEFT) holds "
                  f"{_bytes(baseline)}; net of that floor, peak memory relative to full fine-tuning is: "
                  + ", ".join(net) + "."]
    if state:
        lines += ["", "Trainable state, measured inside a 1-rank DeepSpeed engine after two steps (same widths, "
                  f"{cost['state_probe']['model_layers']} layers), per trainable entry: parameter + fp32 master + "
                  "Adam moments + SIFT index.", ""]
        lines += _table(
            ["method", "trainable", "param B", "master B", "Adam B", "index B", "total B/entry"],
            [[r["label"], _count(r["trainable"]), _f(r["param_bytes"] / r["trainable"], 1),
              _f(r["master_bytes"] / r["trainable"], 1), _f(r["optimizer_bytes"] / r["trainable"], 1),
              _f(r["index_bytes"] / r["trainable"], 1), _f(r["state_bytes_per_trainable"], 1)]
             for r in state.values()],
        )
    selections = [row for row in cost_rows_with_state(cost) if row.get("selection")]
    if selections:
        lines += ["", "Selection pass (the first optimizer batch scored through the trainer, all ranks; per-matrix scope "
                  "inside the DeepSpeed engine, global scope on the plain model before it). x one step: the pass's wall "
                  "time over the median step of the same run, median over rounds; peak memory: the largest rank's, "
                  "over the training steps' peak:", ""]
        lines += _table(
            ["method", "selection (s)", "x one step", "CPU s/step", "peak memory", "x training peak",
             "share of sum(g^2) kept"],
            [[row["label"], _f(row["selection"]["wall_s"], 2), _f(selection_ratio(row)), _f(row.get("step_cpu_s"), 3),
              _bytes(row.get("selection_peak")), _f(ratio(row.get("selection_peak"), peak(row))),
              _f(row["selection"]["grad_sq_share"] * 100, 1, "%")]
             for row in selections],
        )
    return lines


def quality_section(quality: dict) -> list[str]:
    base = quality["base"]["eval_loss"]
    full = next((row for row in quality["rows"] if row["label"] == "full"), None)
    lines = [
        "### Quality: held-out loss after the same steps",
        "",
        f"SmolLM2-135M-Instruct on the Alpaca demo corpus (`{quality['experiment']}`), {quality['ranks']} ranks x "
        f"{quality['micro_batch_size']} examples x {quality['max_length']} tokens, {quality['steps']} steps, the paper's "
        f"learning rates (SIFT and LoRA 2e-4, full fine-tuning 2e-5) and the extra rates shown; held-out loss over all {quality['base']['examples']} validation examples. Base model: "
        f"**{base:.4f}**.",
        "",
    ]
    table = []
    for row in quality["rows"]:
        share = recovery(base, row["eval_loss"], full["eval_loss"]) if full else None
        table.append([row["label"], _count(row["trainable"]), f"{row['lr']:g}", _f(row["eval_loss"], 4),
                      _f(base - row["eval_loss"], 4), _f(share * 100 if share is not None else None, 1, "%")])
    lines += _table(["method", "trainable", "lr", "held-out loss", "reduction", "share of full's reduction"], table)
    others = [row for row in quality["rows"] if row["method"] == "full" and row["label"] != "full"]
    sift = [row for row in quality["rows"] if row["method"] == "sift"]
    for other in others:
        shares = [f"{row['label']} {recovery(base, row['eval_loss'], other['eval_loss']) * 100:.1f}%"
                  for row in sift if recovery(base, row["eval_loss"], other["eval_loss"]) is not None]
        lines += ["", f"Against {other['label']} (held-out loss {other['eval_loss']:.4f}) instead: " + ", ".join(shares) + "."]
    return lines


def stack_section(stack: dict) -> list[str]:
    rows = stack["rows"]
    lora, full = baselines(rows)
    shape = stack["shape"]
    lines = [
        "### LLaMA-7B shapes on a GPU: a stack of decoder layers in plain PyTorch",
        "",
        f"{stack['device']}: {shape['layers']} LLaMA-7B decoder layers (hidden {shape['hidden']}, MLP "
        f"{shape['intermediate']}, {shape['heads']} heads), {shape['dtype']}, batch {shape['batch']} x {shape['seq']} "
        f"tokens, no DeepSpeed; AdamW with an fp32 master for bf16 parameters. Step time: median of "
        f"{stack['timed_steps']} steps after {stack['warmup_steps']} warm-up, pooled over {stack.get('rounds', 1)} "
        "round(s); ratios are the median over rounds of each round's ratio. Memory: CUDA max allocated over the steps.",
        "",
    ]
    table = []
    for row in rows:
        table.append([
            row["label"], _count(row["trainable"]), _bytes(row["peak_bytes"]),
            _f(ratio(row["peak_bytes"], lora["peak_bytes"])), _f(ratio(row["peak_bytes"], full["peak_bytes"])),
            _f(row["step_time_s"] * 1e3, 1), _f(step_ratio(row, lora)), _f(step_ratio(row, full)),
            _f(row["tokens_per_s"], 0),
            _f(row["state_bytes"] / row["trainable"], 1),
            _f(row.get("selection_s") and row["selection_s"] * 1e3, 0),
            _f(ratio(row.get("selection_s"), row["step_time_s"]), 2),
        ])
    lines += _table(["method", "trainable", "peak memory", "x LoRA", "x full", "step (ms)", "x LoRA", "x full",
                     "tokens/s", "state B/entry", "selection (ms)", "x step"], table)
    return lines


def kernels_section(kernels: dict) -> list[str]:
    lines = [
        f"### SIFT layer kernels ({kernels['device']}, {kernels['dtype']})",
        "",
        f"One {kernels['shape'][0]}x{kernels['shape'][1]} matrix, {kernels['tokens']} tokens. Values' gradient alone: "
        "dense row-block product then gather vs the sampled product (SDDMM) and the Triton tile kernel (CUDA); "
        "x @ S^T: the sparse increment's product by the Triton kernel and by CSR, against the dense F.linear; union / "
        "entry: the Triton plan's loaded columns per selected entry. Training pass (forward + backward of the layer): "
        "previous kernels (dense copy of W per product + dense dW) vs current (in-place patch + cost rule), forced "
        "paths, and a frozen nn.Linear (the floor LoRA adds to). Columns without a number in any row are left out.",
        "",
    ]
    rows = kernels["rows"]

    def ms(key):
        return lambda row: _f(row[key] * 1e3 if row.get(key) is not None else None, 2)

    def speedup(key):
        return lambda row: _f(ratio(row.get("dense_dw_s"), row.get(key)), 2)

    # Columns with no number in any row (e.g. Triton's on a CPU) are left out.
    columns = [
        ("dense dW (ms)", "dense_dw_s", ms("dense_dw_s")), ("sampled dW (ms)", "sampled_dw_s", ms("sampled_dw_s")),
        ("sampled speed-up", "sampled_dw_s", speedup("sampled_dw_s")),
        ("triton dW (ms)", "triton_dw_s", ms("triton_dw_s")), ("triton speed-up", "triton_dw_s", speedup("triton_dw_s")),
        ("x@S^T triton (ms)", "inc_triton_s", ms("inc_triton_s")), ("x@S^T CSR (ms)", "inc_csr_s", ms("inc_csr_s")),
        ("dense linear (ms)", "linear_s", ms("linear_s")),
        ("union / entry", "union_per_entry", lambda row: _f(row.get("union_per_entry"), 2)),
        ("pass before (ms)", "pass_before_s", ms("pass_before_s")), ("pass after (ms)", "pass_after_s", ms("pass_after_s")),
        ("pass dense dW (ms)", "pass_dense_s", ms("pass_dense_s")), ("pass triton (ms)", "pass_triton_s", ms("pass_triton_s")),
        ("pass increment + triton (ms)", "pass_increment_triton_s", ms("pass_increment_triton_s")),
        ("frozen Linear (ms)", "pass_frozen_s", ms("pass_frozen_s")),
    ]
    columns = [c for c in columns if any(row.get(c[1]) is not None for row in rows)]
    table = [[f"{row['density'] * 100:g}%"] + [cell(row) for _, _, cell in columns] for row in rows]
    lines += _table(["density"] + [name for name, _, _ in columns], table)
    return lines


def targets_section(targets: list[dict]) -> list[str]:
    lines = ["### Targets (ratios from the same invocation)", ""]
    rows = []
    for target in targets:
        sign = "<=" if target["at_most"] else ">="
        met = {True: "met", False: "**missed**", None: "not measured"}[target["met"]]
        rows.append([target["scope"], target["target"], _f(target["measured"], 3), f"{sign} {target['limit']:g}", met])
    lines += _table(["scope", "target", "measured", "limit", ""], rows)
    return lines


def render_markdown(results: dict) -> str:
    parts = results.get("parts", {})
    lines = [f"## Benchmark: {results.get('name', 'bench')}", ""]
    commands = sorted({part["command"] for part in parts.values() if part.get("command")})
    machines = {json.dumps(part.get("machine", {}), sort_keys=True) for part in parts.values()}
    for command in commands:
        lines.append(f"Command: `{command}`  ")
    for machine in machines:
        info = json.loads(machine)
        lines.append(f"Machine: {info.get('gpu') or 'CPU only'}, {info.get('cpu_count')} CPU cores, torch "
                     f"{info.get('torch')}, {info.get('platform')}  ")
    lines.append("")
    targets = evaluate(results)
    if targets:
        lines += targets_section(targets) + [""]
    from sift_llm.bench.memory import memory_section
    from sift_llm.bench.packing import packing_section
    from sift_llm.bench.selection_scaling import selection_section

    for name, section in (("cost", cost_section), ("quality", quality_section), ("layer_stack", stack_section),
                          ("kernels", kernels_section), ("packing", packing_section), ("memory", memory_section),
                          ("selection", selection_section)):
        if name in parts:
            lines += section(parts[name]) + [""]
    if "quantized" in parts:
        from sift_llm.bench.quantized import quantized_section

        lines += quantized_section(parts["quantized"]) + [""]
    return "\n".join(lines)


def render_chart(results: dict, path: Path) -> Path | None:
    """bench.png: one panel per part present (memory and step time relative to full FT, loss curves, kernels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    parts = results.get("parts", {})
    panels = [name for name in ("cost", "layer_stack", "quality", "kernels", "quantized", "memory", "selection")
              if name in parts]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        part = parts[name]
        if name in ("cost", "layer_stack"):
            rows = part["rows"]
            _, full = baselines(rows)
            labels = [row["label"].replace(" (", "\n(") for row in rows]
            memory = [ratio(peak(row), peak(full)) or 0 for row in rows]
            step = [step_ratio(row, full) or 0 for row in rows]
            xs = range(len(rows))
            ax.bar([x - 0.2 for x in xs], memory, 0.4, label="peak memory")
            ax.bar([x + 0.2 for x in xs], step, 0.4, label="step time")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            top = 1.6
            ax.set_ylim(0, top)
            for x, values in zip(xs, zip(memory, step)):
                for offset, value in zip((-0.2, 0.2), values):
                    ax.text(x + offset, min(value, top) + 0.02, f"{value:.2f}", ha="center", fontsize=6.5,
                            rotation=90, va="bottom" if value < top * 0.85 else "top")
            ax.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=8)
            ax.set_ylabel("relative to full fine-tuning")
            where = "CPU, trainer + DeepSpeed" if name == "cost" else f"{part['device']}, 7B layers"
            ax.set_title(f"Cost ({where})", fontsize=10)
            ax.legend(fontsize=8)
        elif name == "quality":
            base = part["base"]["eval_loss"]
            for row in part["rows"]:
                curve = [[0, base]] + row["eval_curve"]
                ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", ms=3, label=row["label"])
            ax.set_xlabel("step")
            ax.set_ylabel("held-out loss")
            ax.set_title("Quality (SmolLM2-135M, Alpaca demo)", fontsize=10)
            ax.legend(fontsize=8)
        elif name in ("quantized", "memory", "selection"):
            _grouped_bars(ax, name, part)
        else:
            densities = [row["density"] * 100 for row in part["rows"]]
            ax.plot(densities, [row["dense_dw_s"] * 1e3 for row in part["rows"]], marker="o", label="dense row blocks")
            ax.plot(densities, [row["sampled_dw_s"] * 1e3 for row in part["rows"]], marker="o", label="sampled (SDDMM)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set_xlabel("density (%)")
            ax.set_ylabel("values' gradient (ms)")
            ax.set_title(f"SIFT dW kernels ({part['device']})", fontsize=10)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped_bars(ax, name: str, part: dict) -> None:
    """Bar panels of the quantized, memory and selection parts: one group per x label, one bar per series."""
    rows = part["rows"]
    if name == "quantized":
        qlora = next((row for row in rows if row["method"] == "lora"), rows[0])
        groups = [row["label"].replace(" (", "\n(") for row in rows]
        series = {"peak memory": [ratio(row["peak_rss_bytes"] or row["cuda_max_allocated_bytes"],
                                        qlora["peak_rss_bytes"] or qlora["cuda_max_allocated_bytes"]) or 0 for row in rows],
                  "step time": [ratio(row["step_time_s"], qlora["step_time_s"]) or 0 for row in rows]}
        ylabel, title, log = "relative to QLoRA", "SIFT on a 4-bit base vs QLoRA", False
    elif name == "memory":
        groups = list(dict.fromkeys(row["model"].replace(" (", "\n(") for row in rows))
        configs = list(dict.fromkeys(Path(row["deepspeed_config"]).stem for row in rows))
        peaks = {(row["model"].replace(" (", "\n("), Path(row["deepspeed_config"]).stem): row["peak"] for row in rows}
        series = {config: [(peaks.get((group, config)) or 0) / 2**30 for group in groups] for config in configs}
        ylabel, title, log = "peak memory of the largest rank (GiB)", f"Memory per rank ({part['ranks']} ranks)", False
    else:
        groups = list(dict.fromkeys(f"{row['scope']}\n{row['density'] * 100:g}%" for row in rows))
        versions = list(dict.fromkeys(row["version"] for row in rows))
        times = {(f"{row['scope']}\n{row['density'] * 100:g}%", row["version"]): row["selector_s"] for row in rows}
        series = {version: [times.get((group, version)) or 0 for group in groups] for version in versions}
        ylabel, title, log = "selector time (s)", "Selection pass by scope and code version", True
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))]
        ax.bar(xs, values, width, label=label)
        for x, value in zip(xs, values):
            ax.text(x, value, f"{value:.2f}", ha="center", va="bottom", fontsize=6.5)
    if name == "quantized":
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(list(range(len(groups))), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def write_report(results: dict, output: Path) -> None:
    output = Path(output)
    atomic_write_text(output / "bench.md", render_markdown(results) + "\n")
    render_chart(results, output / "bench.png")
