"""WISE's router on the default model: the shipped preset against variants of block, score and pooling, measured.

Each variant is ``python main.py fit --config configs/wise.yaml <its settings>`` on the first ``--limit`` records of
the built-in set or of a ZsRE file (one edit per step, evaluated once after the last edit, per-case averaging), with
``RoutingMonitor``'s shares of edits, paraphrases and unrelated probes routed to the side memory. Prints a table and
writes JSON after every run.

    python benchmarks/wise_router.py --records builtin --limit 30 --variants preset b23_centred_max
    python benchmarks/wise_router.py --records ../shared/data/zsre_eval.json --limit 100 --interval 25 \\
        --pool ../shared/data/zsre_train_1k.json --out docs/benchmarks/wise_router_zsre.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli_runs import REPO, run_cli

ARG = "--model.method.init_args."


GRAMMAR = "<preset|b<block>>[_paper|_centred][_max][_loss][_q][_s<slack>][_w<n>][_k<weight>][_r<n>][_t<q>][_bf16|_f32]"


def variant_args(name: str) -> list[str]:
    """Settings of a variant named by :data:`GRAMMAR`: the shipped preset or the block of the side memory, then the
    paper's or the centred score, the maximum token score for every row, the release's stop rule (loss only, no argmax
    stop), questions in the model-sampled pool, the threshold slack, subject swaps per edit, the weight of the term that
    keeps the swapped prompts' unedited outputs (``swap_kl``), rehearsed earlier edits per step, the threshold
    quantile, and the precision of the frozen model during the memory's SGD (``train_precision`` bfloat16, or the
    model's own float32)."""
    block, *flags = name.split("_")
    numbered = [f for f in flags if f[:1] in "swkrt" and f[1:].replace(".", "", 1).isdigit()]
    known = {"paper", "centred", "max", "loss", "q", "bf16", "f32", *numbered}
    if not (block == "preset" or block.startswith("b") and block[1:].isdigit()) or set(flags) - known:
        raise SystemExit(f"variant '{name}': expected {GRAMMAR}")
    args = [] if block == "preset" else [f"{ARG}module", block[1:]]
    for score in {"paper", "centred"} & set(flags):
        args += [f"{ARG}score", score]
    if "max" in flags:
        args += [f"{ARG}long_input_max", "0"]
    if "loss" in flags:
        args += [f"{ARG}stop_on_argmax", "false"]
    if "q" in flags:
        args += [f"{ARG}pool_questions", "true"]
    for flag, precision in (("bf16", "bfloat16"), ("f32", "model")):
        if flag in flags:
            args += [f"{ARG}train_precision", precision]
    names = {"s": "slack", "w": "subject_swaps", "k": "swap_kl", "r": "rehearse", "t": "threshold_quantile"}
    for flag in numbered:
        args += [f"{ARG}{names[flag[0]]}", flag[1:]]
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="builtin", help="'builtin' or a ZsRE file")
    parser.add_argument("--limit", type=int, default=30, help="edits in the stream (T)")
    parser.add_argument("--pool", default=None, help="irrelevant_pool (default: the config's, model samples)")
    parser.add_argument("--interval", type=int, default=0, help="also evaluate every this many edits (0: at the end)")
    parser.add_argument("--variants", nargs="+", default=["preset", "b23_centred_max"])
    parser.add_argument("--work-dir", default="runs/wise_router")
    parser.add_argument("--out", default="docs/benchmarks/wise_router_builtin.json")
    parser.add_argument("--reuse", action="store_true", help="keep the runs already in --work-dir")
    opts = parser.parse_args()
    data = [] if opts.records == "builtin" else ["--data.path", opts.records, "--data.format", "zsre"]
    common = [*data, "--data.limit", str(opts.limit), "--model.fluency", "false", "--trainer.logger", "false"]
    common += ["--trainer.enable_progress_bar", "false"]
    if opts.interval:
        common += ["--trainer.val_check_interval", str(opts.interval)]
    if opts.pool:
        common += [f"{ARG}irrelevant_pool", opts.pool]
    out = REPO / opts.out
    results: dict = {"protocol": vars(opts), "runs": {}}
    for name in opts.variants:
        args = ["fit", "--config", "configs/wise.yaml", *common, *variant_args(name)]
        summary = run_cli(args, REPO / opts.work_dir / Path(opts.records).stem / name, opts.reuse)
        results["runs"][name] = {
            "settings": variant_args(name),
            "metrics": summary["metrics"],
            "history": summary["history"],
            "routing": summary.get("routing", {}),
            "seconds_per_edit": summary["timing"]["seconds_per_step"],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    print("| variant | reliability | generalization | locality | edits routed | paraphrases routed | unrelated routed")
    print("|---|---|---|---|---|---|---")
    for name, run in results["runs"].items():
        m, r = run["metrics"], run["routing"]
        cells = [m.get("efficacy"), m.get("generalization"), m.get("locality")]
        cells += [r.get(f"{kind}/routed") for kind in ("edit", "paraphrase", "unrelated")]
        print(f"| {name} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
