"""Where an edit's seconds go: LyapLock at 10 and at 100 edits per step, float32 against bfloat16 targets, one job.

Each run is ``python main.py fit --config configs/lyaplock.yaml`` on the same first ``--limit`` records of
``counterfact_easyedit_train.json`` (the long-stream file, unshuffled), evaluated once after the last edit. Per
edit: targets / keys / solve / evaluation seconds, and the target optimisation against its FLOP floor at this
machine's float32 and bfloat16 matmul rates, measured in the same job at the upper blocks' MLP shape. Then the
profile of one target iteration (``torch.profiler``; the difference between ``1 + --iterations`` iterations and 1,
so the once-per-step capture and prefix runs drop out) at 100 requests, by operator and by kind. Prints tables and
writes JSON after every run.

    python benchmarks/edit_speed.py --limit 100 --out docs/benchmarks/edit_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runs import DATA, REPO, run_cli  # noqa: E402
from flops import matmul_flops_per_second, mlp_shape, upper_block_params  # noqa: E402

from editing.locate import compute_targets, generate_context_templates  # noqa: E402
from editing.models import DTYPES, default_mlp_layers, load_model, reduced_precision_copy  # noqa: E402
from editing.requests import read_requests  # noqa: E402

CONFIG = REPO / "configs" / "lyaplock.yaml"
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm"}
ATTENTION = {"aten::_softmax", "aten::_softmax_backward_data", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def label(precision: str) -> str:
    """``model`` is the model's own precision: float32 for the embedded model."""
    return "float32" if precision == "model" else precision


def run_args(opts: argparse.Namespace, edits_per_step: int, precision: str) -> list[str]:
    return [
        "fit", "--config", str(CONFIG), "--data.path", opts.data, "--data.format", "easyedit",
        "--data.limit", str(opts.limit), "--data.edits_per_step", str(edits_per_step),
        "--model.method.init_args.target_precision", precision, "--model.method.init_args.stop_rule", opts.stop_rule,
        "--model.method.init_args.stats_corpus", opts.corpus, "--model.method.init_args.stats_tokens", "50000",
        "--model.step_metrics", "false", "--model.fluency", "false", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def per_edit(summary: dict, edits: int, edits_per_step: int, upper: int, rates: dict[str, float]) -> dict:
    """Seconds per edit by phase and the target optimisation's distance from its FLOP floor at each matmul rate."""
    split = {k: v / edits_per_step for k, v in summary["timing"]["split"].items()}
    evaluation = summary["timing"]["evaluation_seconds"] / edits
    steps = summary["steps"]
    flops = sum(4 * upper * s.get("train/target_tokens", 0) for s in steps)
    target_seconds = sum(s["targets"] for s in steps)
    return {
        "seconds_per_edit": {**split, "evaluation": evaluation, "total": sum(split.values()) + evaluation},
        "x_flop_floor": {name: target_seconds / (flops / rate) for name, rate in rates.items()},
        "mean_target_iterations": sum(s["train/target_steps"] for s in steps) / len(steps),
        "metrics": summary["metrics"],
        "peak_rss_mb": summary["timing"]["peak_rss_mb"],
    }


def kind_of(operator: str, tag: str) -> str:
    if tag:
        return "matmul, LM head"
    if operator in MATMULS:
        return "matmul, blocks"
    return "attention softmax" if operator in ATTENTION else "other operators"


def profile_iteration(opts: argparse.Namespace, precision: str) -> dict:
    """Self CPU milliseconds of one target iteration at ``--profile-requests`` requests, by operator and by kind."""
    model, tokenizer = load_model()
    requests = read_requests(opts.data, "easyedit", limit=opts.profile_requests)
    templates = generate_context_templates(model, tokenizer)
    runner = None if precision == "model" else reduced_precision_copy(model, DTYPES[precision])
    vocab = model.config.vocab_size
    layer = default_mlp_layers(model)[-1]
    totals, walls = [], []
    for iterations in (1, 1 + opts.iterations):
        with torch.profiler.profile(record_shapes=True) as prof:
            start = time.perf_counter()
            never_stop = -1.0  # below any loss: every request runs every iteration
            compute_targets(
                model, tokenizer, requests, layer, templates, steps=iterations, stop_loss=never_stop, runner=runner
            )
            walls.append(time.perf_counter() - start)
        ops: dict[tuple[str, str], float] = defaultdict(float)
        for event in prof.key_averages(group_by_input_shape=True):
            if event.key.startswith("aten::"):  # leaf operators; user annotations (Optimizer.step) are inclusive
                is_head = event.key in MATMULS and any(vocab in shape for shape in event.input_shapes if shape)
                ops[(event.key, "LM head" if is_head else "")] += event.self_cpu_time_total / 1e3
        totals.append(ops)
    per_op = {k: (totals[1].get(k, 0.0) - totals[0].get(k, 0.0)) / opts.iterations for k in totals[1]}
    wall = (walls[1] - walls[0]) / opts.iterations * 1e3
    kinds: dict[str, float] = defaultdict(float)
    for (name, tag), ms in per_op.items():
        kinds[kind_of(name, tag)] += ms
    kinds["outside operators (Python, dispatch)"] = wall - sum(per_op.values())
    top = sorted(per_op.items(), key=lambda item: -item[1])[:12]
    return {
        "requests": opts.profile_requests,
        "wall_ms": wall,
        "by_kind_ms": dict(kinds),
        "top_operators_ms": {f"{name} {tag}".strip(): ms for (name, tag), ms in top},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "counterfact_easyedit_train.json"))
    parser.add_argument("--limit", type=int, default=100, help="edits per run")
    parser.add_argument("--edits-per-step", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--precisions", nargs="+", default=["model", "bfloat16"], help="target_precision values")
    parser.add_argument("--stop-rule", default="argmax", help="stop_rule of the target optimisation")
    parser.add_argument("--corpus", default=str(DATA / "wiki_sample.txt"), help="C0 corpus (default: WikiText)")
    parser.add_argument("--profile-requests", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=4, help="profiled iterations beyond the first")
    parser.add_argument("--work-dir", default="runs/edit_speed")
    parser.add_argument("--out", default="docs/benchmarks/edit_speed.json")
    parser.add_argument("--reuse", action="store_true", help="reuse summaries already in --work-dir")
    opts = parser.parse_args()
    if not Path(opts.data).exists():
        sys.exit(f"data file {opts.data} not found (expected ../shared/data beside the repo)")
    if any(opts.limit % n for n in opts.edits_per_step):
        sys.exit(f"--limit {opts.limit} is not a multiple of every --edits-per-step {opts.edits_per_step}")
    hidden, intermediate = mlp_shape()
    rates = {
        name: matmul_flops_per_second(2048, hidden, intermediate, dtype)
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    report: dict = {"protocol": vars(opts), "matmul_gflops": {k: v / 1e9 for k, v in rates.items()}, "runs": {}}
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    upper = upper_block_params(CONFIG)
    for n in opts.edits_per_step:
        for precision in opts.precisions:
            name = f"{n}_per_step_{label(precision)}"
            summary = run_cli(run_args(opts, n, precision), REPO / opts.work_dir / name, opts.reuse)
            report["runs"][name] = per_edit(summary, opts.limit, n, upper, rates)
            out.write_text(json.dumps(report, indent=2))
    report["profile"] = {label(precision): profile_iteration(opts, precision) for precision in opts.precisions}
    out.write_text(json.dumps(report, indent=2))
    print(format_tables(report))
    print(f"wrote {out}")


def format_tables(report: dict) -> str:
    """Markdown tables of the report (also pasted into docs/benchmarks.md)."""
    rates = report["matmul_gflops"]
    lines = ["matmul GFLOP/s at the MLP shape: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()), ""]
    lines += ["| run | efficacy | generalization | targets | keys | solve | evaluation | total s/edit | iterations"
              + "".join(f" | x floor ({k})" for k in rates) + " |"]  # fmt: skip
    lines.append("|" + "---|" * (9 + len(rates)))
    for name, run in report["runs"].items():
        s, m = run["seconds_per_edit"], run["metrics"]
        cells = [name, f"{m['efficacy']:.3f}", f"{m['generalization']:.3f}"]
        cells += [f"{s[k]:.2f}" for k in ("targets", "keys", "solve", "evaluation", "total")]
        cells += [f"{run['mean_target_iterations']:.1f}"] + [f"{run['x_flop_floor'][k]:.1f}" for k in rates]
        lines.append("| " + " | ".join(cells) + " |")
    for precision, prof in report.get("profile", {}).items():
        lines += ["", f"one target iteration, {prof['requests']} requests, {precision}: {prof['wall_ms']:.0f} ms"]
        lines += ["| kind | ms | share |", "|---|---|---|"]
        for kind, ms in sorted(prof["by_kind_ms"].items(), key=lambda item: -item[1]):
            lines.append(f"| {kind} | {ms:.0f} | {ms / prof['wall_ms']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
