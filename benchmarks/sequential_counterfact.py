"""Sequential CounterFact benchmark: LyapLock, MEMIT and AlphaEdit side by side on one edit stream, in one job.

Each method runs as ``python main.py fit`` (so its peak memory is its own) on the same requests, layers, corpus and
order; the unedited model is scored once with ``python main.py validate``. Prints a table and writes JSON with the
quality metrics, seconds per step split into targets/keys/solve/evaluation, peak RSS, and how far the target
optimisation is from the FLOP floor of this machine (measured matmul throughput in the same job).

    python benchmarks/sequential_counterfact.py --limit 100 --edits-per-step 10 --out docs/benchmarks/counterfact.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runs import DATA, REPO, run_cli  # noqa: E402
from flops import matmul_flops_per_second, upper_block_params  # noqa: E402

METHODS = {"lyaplock": "configs/lyaplock.yaml", "memit": "configs/memit.yaml", "alphaedit": "configs/alphaedit.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "counterfact.json"))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--edits-per-step", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--corpus", default=str(DATA / "wiki_sample.txt"), help="C0 corpus (default: WikiText)")
    parser.add_argument("--stats-tokens", type=int, default=50_000)
    parser.add_argument("--work-dir", default="runs/bench_counterfact")
    parser.add_argument("--out", default="docs/benchmarks/counterfact.json")
    parser.add_argument("--reuse", action="store_true", help="reuse summaries already in --work-dir")
    parser.add_argument("--extra", nargs="*", default=[], help="extra CLI arguments passed to every run")
    parser.add_argument(
        "--fluency", action="store_true", help="also measure ROME's fluency (~8 min per evaluation of 100 records)"
    )
    opts = parser.parse_args()
    if not Path(opts.data).exists():
        sys.exit(f"data file {opts.data} not found (expected ../shared/data beside the repo)")

    common = [
        "--data.path", opts.data, "--data.limit", str(opts.limit), "--data.edits_per_step", str(opts.edits_per_step),
        "--model.method.init_args.stats_corpus", opts.corpus,
        "--model.method.init_args.stats_tokens", str(opts.stats_tokens), "--model.step_metrics", "false",
        "--model.fluency", str(opts.fluency).lower(), *opts.extra,
    ]  # fmt: skip
    work = REPO / opts.work_dir
    results: dict[str, dict] = {}
    peak_flops = 0.0  # measured once, after the first method's run, in the same job
    unedited = run_cli(["validate", "--config", METHODS[opts.methods[0]], *common], work / "unedited", opts.reuse)
    results["unedited"] = {"metrics": unedited["metrics"]}
    for name in opts.methods:
        summary = run_cli(["fit", "--config", METHODS[name], *common], work / name, opts.reuse)
        steps = summary["steps"]
        upper = upper_block_params(REPO / METHODS[name])
        peak_flops = peak_flops or matmul_flops_per_second()
        target_flops = sum(4 * upper * s.get("train/target_tokens", 0) for s in steps)
        target_seconds = sum(s["targets"] for s in steps)
        results[name] = {
            "metrics": summary["metrics"],
            "seconds_per_step": {
                **summary["timing"]["split"],
                "evaluation": summary["timing"]["evaluation_seconds"],
                "total_edit": summary["timing"]["seconds_per_step"],
            },
            "peak_rss_mb": summary["timing"]["peak_rss_mb"],
            "target_flop_floor_ratio": target_seconds / (target_flops / peak_flops) if target_flops else None,
            "mean_target_steps": sum(s["train/target_steps"] for s in steps) / len(steps),
            "protocol": summary["protocol"],
        }
    report = {
        "data": opts.data,
        "edits": opts.limit,
        "edits_per_step": opts.edits_per_step,
        "stats_corpus": opts.corpus,
        "stats_tokens": opts.stats_tokens,
        "machine_matmul_gflops": peak_flops / 1e9,
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out}")


def format_table(report: dict) -> str:
    """Markdown table of the report (also pasted into docs/benchmarks.md)."""
    columns = ["method", "efficacy", "generalization", "specificity", "locality", "targets s", "keys s", "solve s"]
    columns += ["eval s", "peak RSS MB", "x FLOP floor"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, r in report["results"].items():
        m = r["metrics"]
        t = r.get("seconds_per_step", {})
        cells = [name] + [
            f"{m.get(k, float('nan')):.3f}" for k in ("efficacy", "generalization", "specificity", "locality")
        ]
        cells += [f"{t[k]:.1f}" if k in t else "" for k in ("targets", "keys", "solve", "evaluation")]
        cells += [f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""]
        cells += [f"{r['target_flop_floor_ratio']:.1f}" if r.get("target_flop_floor_ratio") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
