"""WISE on ZsRE, the paper's protocol: sequential, one edit per step, evaluated after the last edit.

Runs ``python main.py fit --config configs/wise.yaml`` on the first ``T`` records of ``../shared/data/zsre_eval.json``
for each ``T`` (and a longer WISE-Merge run whose small ``save_freq``/``merge_freq`` put it past a merge), with the
irrelevant sentences drawn from ZsRE's training records (``loc`` questions, as the paper does), and the unedited model
once with ``validate``. Prints a table of reliability (efficacy), generalization and locality (token accuracy;
locality = agreement with the unedited model) with seconds per edit split into activation caching, masked SGD,
step metrics and the final evaluation, and writes JSON.

    python benchmarks/wise_zsre.py --runs t10:10 t100:100 merge:40:10:20 --out docs/benchmarks/wise_zsre.json

``--iteration-cost`` also times one SGD iteration of this implementation against the reference's way (a full
forward and backward of the whole model over the edit and irrelevant rows, logits at every position), in one process
on the same rows, and reports the ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from cli_runs import DATA, REPO, run_cli


def schedule_config(path: Path, save_freq: int, merge_freq: int, retrieve: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.WiseMemory\n"
        f"      init_args: {{save_freq: {save_freq}, merge_freq: {merge_freq}, retrieve: {str(retrieve).lower()}}}\n"
        "    - class_path: callbacks.RoutingMonitor\n"
    )
    return path


def evaluations(run_dir: Path) -> list[dict[str, float]]:
    """Every evaluation of a run (``--trainer.val_check_interval`` below ``T`` gives several): edits so far, the
    metrics and the routing values, from the run's ``metrics.csv``."""
    rows = list(csv.DictReader(next(run_dir.glob("csv/version_*/metrics.csv")).open()))
    keep = lambda key: key.startswith(("val/", "routing/"))  # noqa: E731
    return [
        {"edits": int(row["step"]) + 1, **{k: float(v) for k, v in row.items() if keep(k) and v}}
        for row in rows
        if row.get("val/efficacy")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", nargs="+", default=["t10:10", "t100:100", "merge:40:10:20"],
        help="NAME:T for the default schedule, NAME:T:SAVE_FREQ:MERGE_FQ[:retrieve] for a small one",
    )  # fmt: skip
    parser.add_argument("--data", default=str(DATA / "zsre_eval.json"))
    parser.add_argument("--pool", default=str(DATA / "zsre_train_1k.json"), help="irrelevant sentences")
    parser.add_argument("--work-dir", default="runs/bench_wise")
    parser.add_argument("--out", default="docs/benchmarks/wise_zsre.json")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument(
        "--extra", action="append", default=[], help="an extra CLI argument for every run (--extra=--k=v, repeatable)"
    )
    parser.add_argument("--iteration-cost", action="store_true", help="time one SGD iteration vs the reference's")
    opts = parser.parse_args()
    if not Path(opts.data).exists():
        sys.exit(f"data file {opts.data} not found (expected ../shared/data beside the repo)")
    work = REPO / opts.work_dir
    common = ["--data.path", opts.data, "--data.format", "zsre", *opts.extra]
    longest = max(int(spec.split(":")[1]) for spec in opts.runs)
    unedited = run_cli(["validate", "--config", "configs/wise.yaml", *common, "--data.limit", str(longest)],
                   work / "unedited", opts.reuse)  # fmt: skip
    results = {"unedited": {"edits": 0, "metrics": unedited["metrics"]}}
    for spec in opts.runs:
        name, t, *schedule = spec.split(":")
        args = ["fit", "--config", "configs/wise.yaml", *common, "--data.limit", t,
                "--model.method.init_args.irrelevant_pool", opts.pool]  # fmt: skip
        if schedule:
            retrieve = len(schedule) > 2 and schedule[2] == "retrieve"
            cfg = schedule_config(work / f"{name}.yaml", int(schedule[0]), int(schedule[1]), retrieve)
            args += ["--config", str(cfg)]
        summary = run_cli(args, work / name, opts.reuse)
        steps = summary["steps"]
        mean = {k: sum(s.get(k, 0.0) for s in steps) / len(steps) for k in ("capture", "train", "train/wise_steps")}
        results[name] = {
            "edits": int(t),
            "schedule": schedule or "save_freq 500, merge_freq 1000 (no shard boundary)",
            "metrics": summary["metrics"],
            "seconds_per_edit": {
                "activation_cache": mean["capture"],
                "masked_sgd": mean["train"],
                "edit_total": mean["capture"] + mean["train"],
            },
            "final_evaluation_seconds": summary["timing"]["evaluation_seconds"],
            "mean_sgd_iterations": mean["train/wise_steps"],
            "peak_rss_mb": summary["timing"]["peak_rss_mb"],
            "history": evaluations(work / name),
        }
    report = {"data": opts.data, "pool": opts.pool, "results": results}
    if opts.iteration_cost:
        report["iteration_seconds"] = iteration_cost(opts.data, opts.pool)
        print("seconds per SGD iteration:", report["iteration_seconds"])
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(format_table(results))
    print(f"wrote {out}")


def iteration_cost(data: str, pool: str, iterations: int = 10) -> dict[str, float]:
    """Seconds per SGD iteration on the first ZsRE request: this implementation (``WISE.apply`` with early stopping
    off, which runs only the blocks from the side memory up, the LM head at target positions, and scores the
    irrelevant rows from cached activations) against the reference's way (the whole model, forward and backward, on
    the edit rows and the irrelevant row, logits everywhere), same rows, same process."""
    import time

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from editing.cache import default_cache_dir
    from editing.methods import WISE
    from editing.models import EMBEDDED_MODEL, load_model
    from editing.requests import read_requests

    model, tokenizer = load_model(EMBEDDED_MODEL, torch.float32, default_cache_dir())
    request = read_requests(data, "zsre")[0]
    method = WISE(prefixes=5, irrelevant_pool=pool, steps=iterations, stop_loss=0.0, stop_on_argmax=False)
    method.setup(model, tokenizer, EMBEDDED_MODEL, default_cache_dir())
    plan = method.prepare([request])
    method.apply([request], plan)  # warm-up
    plan = method.prepare([request])
    start = time.perf_counter()
    method.apply([request], plan)
    ours = (time.perf_counter() - start) / iterations

    rows = plan.rows
    tau = torch.zeros(method.memory.shape, requires_grad=True)
    with method.training_pass(model, tau):  # the task vector answers every row, as in WISE.apply
        start = time.perf_counter()
        for _ in range(iterations):
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits  # every position
            r, p, ids = rows.target_positions()
            loss = F.cross_entropy(logits[r, p], ids)
            model(
                input_ids=rows.input_ids[:1], attention_mask=rows.attention_mask[:1]
            )  # stands in for the irrelevant row
            loss.backward()
            tau.grad = None
        reference = (time.perf_counter() - start) / iterations
    return {"this_implementation": ours, "full_model_reference": reference, "ratio": reference / ours}


def format_table(results: dict) -> str:
    cols = ["run", "T", "reliability", "generalization", "locality", "s/edit (cache + SGD)", "SGD iters", "eval s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in results.items():
        m = r["metrics"]
        t = r.get("seconds_per_edit", {})
        scores = [f"{m.get(k, float('nan')):.3f}" for k in ("efficacy", "generalization", "locality")]
        cells = [name, str(r["edits"]), *scores]
        cells.append(f"{t['edit_total']:.1f} ({t['activation_cache']:.1f} + {t['masked_sgd']:.1f})" if t else "-")
        cells.append(f"{r['mean_sgd_iterations']:.1f}" if "mean_sgd_iterations" in r else "-")
        cells.append(f"{r['final_evaluation_seconds']:.0f}" if r.get("final_evaluation_seconds") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
