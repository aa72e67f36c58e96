"""Seconds per edit step with one process x 2 threads vs two DDP processes x 1 thread (gloo), same stream, same job.

Each configuration is one ``python main.py fit`` on the same CounterFact records (``--limit`` edits,
``--edits-per-step`` per step, evaluated once after the last edit); the split per step (targets / keys / solve,
rank 0's clock) and the evaluation time come from each run's ``summary.json``. From the measured split the table
also projects N devices: targets and keys are sharded (divided by N), the float64 solve is replicated (not divided).

    python benchmarks/ddp_scaling.py --limit 40 --edits-per-step 20 --out docs/benchmarks/ddp_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cli_runs import DATA, REPO, run_cli

CONFIGS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}


def fit(opts: argparse.Namespace, devices: int, threads: int, root: Path) -> tuple[dict, float]:
    args = [
        "fit", "--config", f"configs/{opts.method}.yaml",
        "--data.path", opts.data, "--data.format", "easyedit", "--data.limit", str(opts.limit),
        "--data.edits_per_step", str(opts.edits_per_step),
        "--model.method.init_args.stats_corpus", opts.corpus, "--model.method.init_args.stats_tokens", "50000",
        "--model.step_metrics", "false", "--model.fluency", "false", "--trainer.logger", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        *(["--trainer.strategy", "ddp"] if devices > 1 else []),
    ]  # fmt: skip
    os.environ["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    summary = run_cli(args, root, reuse=False)
    return summary, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "counterfact_easyedit_train.json"))
    parser.add_argument("--corpus", default=str(DATA / "wiki_sample.txt"), help="C0 corpus (cached after the first)")
    parser.add_argument("--method", default="lyaplock", choices=["lyaplock", "memit", "alphaedit"])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--edits-per-step", type=int, default=20)
    parser.add_argument("--work-dir", default="runs/ddp_scaling")
    parser.add_argument("--out", default="docs/benchmarks/ddp_scaling.json")
    opts = parser.parse_args()
    rows = {}
    for name, (devices, threads) in CONFIGS.items():
        summary, wall = fit(opts, devices, threads, REPO / opts.work_dir / f"p{devices}")
        timing = summary["timing"]
        rows[name] = {
            "seconds_per_step": timing["seconds_per_step"],
            **{f"{k}_per_step": v for k, v in timing["split"].items()},
            "evaluation_seconds": timing["evaluation_seconds"],
            "wall_seconds": wall,
            "metrics": summary["metrics"],
        }
    base = rows["1 process x 2 threads"]
    for row in rows.values():
        row["speedup_per_step"] = base["seconds_per_step"] / row["seconds_per_step"]
    sharded = base["targets_per_step"] + base["keys_per_step"]
    projection = {n: sharded / n + base["solve_per_step"] for n in (1, 2, 4, 8)}
    result = {"protocol": vars(opts), "runs": rows, "projected_seconds_per_step": projection}
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| configuration | s/step | targets | keys | solve | evaluation s | wall s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['seconds_per_step']:.1f} | {row['targets_per_step']:.1f} | {row['keys_per_step']:.1f} "
            f"| {row['solve_per_step']:.2f} | {row['evaluation_seconds']:.1f} | {row['wall_seconds']:.0f} "
            f"| {row['speedup_per_step']:.2f}x |"
        )
    print("projected s/step on N devices (targets and keys sharded, solve replicated):", projection)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
