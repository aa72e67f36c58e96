"""Long sequential streams: LyapLock vs MEMIT vs AlphaEdit on thousands of CounterFact edits, 100 per step.

Each method runs as ``python main.py fit`` on the same seeded stream of ``counterfact_easyedit_train.json`` (one run
after the other, never side by side), evaluated every ``--interval`` edit steps on a fixed, seeded sample of the edits
so far (``--model.eval_sample``) and on all edits at the end, with general ability (``callbacks.GeneralAbility``),
held-out WikiText perplexity and the spectrum of every edited matrix measured along the stream. While a run goes on,
its report (``python -m editing.report``: Markdown + PNG curves) and this script's JSON are rewritten every minute,
so a run cut short still leaves its curves. At the end the runs are overlaid in one report and the table at the
milestones (1k, 2k, 5k, 10k edits) is printed, with the unedited model's row (the first ``--sample`` edits of the
records of the stream file, ``validate``) beside it.

    python benchmarks/long_stream.py --limit 3000 --methods lyaplock memit alphaedit --out docs/long_stream

A stream longer than one sitting continues where its last checkpoint left it with the same arguments and
``--resume`` (``--work-dir`` may be an absolute path outside the repository, for example in the cache directory).

Variants for the LyapLock questions: ``lyaplock_q1`` holds the queue at 1 (a budget no loss reaches: the replaying
anchored update without the queue's extra weight), ``lyaplock_tight`` sets a budget of 4 that D(W) passes after
~400 edits of this stream, so the queue acts, ``lyaplock_budget15`` one between the two that layer 7's D(W) passes
after ~1,050 edits (the preset's D reached 13.8 D_base at 1,000 edits, 15.8 at 1,100), ``lyaplock_10layers`` edits
blocks 3-12 instead of 3-7 (capacity or drift?), ``lyaplock_tight_nullspace`` is ``lyaplock_tight`` with AlphaEdit's
null-space projection (``nullspace_threshold`` 2e-2, ridge 10: AlphaEdit's release settings) and
``lyaplock_budget15_nullspace`` the same projection under the budget of 15.

A stream may stop short of its length (``--extra=--trainer.max_steps=30``: all edits so far are scored at the stop)
and go on later with ``--resume`` and a larger ``max_steps``, as the stream's fingerprint covers all ``--limit``
records: ``--limit 10000`` streams all 9,952 records of the file in a seeded order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cli_runs import DATA, REPO, run_cli

sys.path.insert(0, str(REPO))
from editing.report import write_report  # noqa: E402

LYAPLOCK = ["--config", "configs/lyaplock.yaml"]
# a budget this stream's D(W) passes after ~400 edits (the preset's 60 is at 23% after 1,000): the queue acts
TIGHT = ["--model.method.init_args.budget", "4"]
# between the two: layer 7's D(W) passes it after ~1,050 edits, layer 3's after ~1,300
MIDDLE = ["--model.method.init_args.budget", "15"]
# capacity or drift: blocks 3-12 instead of the preset's 3-7
TEN_LAYERS = ["--model.method.init_args.layers", "[3,4,5,6,7,8,9,10,11,12]"]
# AlphaEdit's projection (the release's threshold) under LyapLock's queue
NULLSPACE = ["--model.method.init_args.nullspace_threshold", "2e-2"]
METHODS: dict[str, list[str]] = {
    "lyaplock": LYAPLOCK,
    "memit": ["--config", "configs/memit.yaml"],
    "alphaedit": ["--config", "configs/alphaedit.yaml"],
    "lyaplock_q1": [*LYAPLOCK, "--model.method.init_args.budget", "1e12"],
    "lyaplock_tight": [*LYAPLOCK, *TIGHT],
    "lyaplock_budget15": [*LYAPLOCK, *MIDDLE],
    "lyaplock_10layers": [*LYAPLOCK, *TEN_LAYERS],
    "lyaplock_tight_10layers": [*LYAPLOCK, *TIGHT, *TEN_LAYERS],
    "lyaplock_tight_nullspace": [*LYAPLOCK, *TIGHT, *NULLSPACE],
    "lyaplock_budget15_nullspace": [*LYAPLOCK, *MIDDLE, *NULLSPACE],
}
MILESTONES = (1000, 2000, 5000, 10000)
KEYS = ("efficacy", "generalization", "specificity", "locality", "perplexity", "scored_edits")


def stream_args(opts: argparse.Namespace) -> list[str]:
    """The stream, corpus and evaluation settings every run shares."""
    return [
        "--data.path", opts.data, "--data.format", "easyedit", "--data.limit", str(opts.limit),
        "--data.edits_per_step", str(opts.edits_per_step), "--data.shuffle", "true", "--data.seed", str(opts.seed),
        "--model.method.init_args.stats_corpus", opts.corpus, "--model.method.init_args.stats_tokens", "50000",
        "--model.step_metrics", "false", "--model.fluency", "false", *opts.extra,
    ]  # fmt: skip


def monitors(opts: argparse.Namespace) -> list[str]:
    """The callbacks that measure along the stream (each ``callbacks+=`` takes the init args that follow it)."""
    return [
        "--trainer.callbacks+=callbacks.GeneralAbility", f"--trainer.callbacks.examples={opts.general_examples}",
        "--trainer.callbacks+=callbacks.HeldOutPerplexity", f"--trainer.callbacks.path={opts.corpus}",
        "--trainer.callbacks+=callbacks.ConditionNumberMonitor", f"--trainer.callbacks.every_n_steps={opts.interval}",
    ]  # fmt: skip


def run_method(name: str, opts: argparse.Namespace, root: Path, out: Path, results: dict) -> None:
    """``main.py fit`` for one method, its report and this script's JSON rewritten every minute while it runs."""
    cmd = [
        sys.executable, "main.py", "fit", *METHODS[name], *stream_args(opts), *monitors(opts),
        "--model.eval_sample", str(opts.sample), "--trainer.val_check_interval", str(opts.interval),
        "--checkpoint.every_n_train_steps", str(opts.interval), "--trainer.default_root_dir", str(root),
    ]  # fmt: skip
    checkpoint = root / "checkpoints" / "last.ckpt"
    if opts.resume and checkpoint.exists():  # the stream fingerprint in the checkpoint must match these arguments
        cmd += ["--ckpt_path", str(checkpoint)]
    print("$", " ".join(cmd), flush=True)
    process = subprocess.Popen(cmd, cwd=REPO)
    while process.poll() is None:
        time.sleep(60)
        refresh(name, root, out, results)
    if process.returncode:
        sys.exit(f"{name}: main.py exited with {process.returncode}")
    refresh(name, root, out, results)


def refresh(name: str, root: Path, out: Path, results: dict) -> None:
    """Once a run's first evaluation is in, its milestones in the JSON and its report (matplotlib missing: the JSON
    is still written)."""
    if not (root / "summary.json").exists():
        return
    results["runs"][name] = at_milestones(json.loads((root / "summary.json").read_text()))
    write_results(results, out)
    try:
        write_report([root], out / name)
    except ImportError as err:
        print(f"report skipped: {err}", flush=True)


def at_milestones(summary: dict) -> dict[int, dict[str, float]]:
    """The evaluation at (or last before) each milestone the run reached, every one that scored all edits so far (the
    end of each sitting of a stream run in sittings) and the final one."""
    history = summary.get("history", [])
    complete = [h["edits"] for h in history if h["metrics"].get("scored_edits") == h["edits"]]
    rows = {}
    for milestone in sorted({*MILESTONES, *complete, summary["protocol"]["total_edits"]}):
        before = [h for h in history if h["edits"] <= milestone]
        if before and milestone <= summary["protocol"]["total_edits"]:  # keyed by edits: a stop short of a milestone
            rows[before[-1]["edits"]] = {"edits": before[-1]["edits"], **before[-1]["metrics"]}
    general = summary.get("curves", {}).get("GeneralAbility", [])
    for row in rows.values():
        at = [g for g in general if g["edits"] <= row["edits"]]
        if at:
            row.update({f"general/{task}": v for task, v in at[-1]["scores"].items()})
    return rows


def write_results(results: dict, out: Path) -> None:
    """``long_stream.json`` and a Markdown table of every run at its milestones."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_stream.json").write_text(json.dumps(results, indent=2))
    lines = ["| run | edits | " + " | ".join(KEYS) + " |", "|" + "---|" * (len(KEYS) + 2)]
    for name, rows in results["runs"].items():
        for _, row in sorted(rows.items(), key=lambda item: int(item[0])):
            cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float) else "" for k in KEYS]
            lines.append(f"| {name} | {row['edits']} | " + " | ".join(cells) + " |")
    (out / "long_stream.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "counterfact_easyedit_train.json"))
    parser.add_argument("--corpus", default=str(DATA / "wiki_sample.txt"), help="C0 corpus and held-out text")
    parser.add_argument("--limit", type=int, default=3000, help="edits in the stream")
    parser.add_argument("--edits-per-step", type=int, default=100)
    parser.add_argument("--interval", type=int, default=5, help="edit steps between evaluations")
    parser.add_argument("--sample", type=int, default=500, help="edits scored at periodic evaluations")
    parser.add_argument("--general-examples", type=int, default=100, help="examples per general-ability task")
    parser.add_argument("--seed", type=int, default=0, help="order of the stream")
    parser.add_argument("--methods", nargs="+", default=["lyaplock", "memit", "alphaedit"], choices=list(METHODS))
    parser.add_argument("--work-dir", default="runs/long_stream", help="run directories (relative to the repo)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue each run from its work-dir checkpoint (written every --interval steps) where there is one",
    )
    parser.add_argument(
        "--extra", action="append", default=[], help="an extra CLI argument for every run (--extra=--k=v, repeatable)"
    )
    parser.add_argument("--out", default="docs/long_stream")
    opts = parser.parse_args()
    if not Path(opts.data).exists():
        sys.exit(f"data file {opts.data} not found (expected ../shared/data beside the repo)")
    work, out = REPO / opts.work_dir, REPO / opts.out
    unedited = run_cli(
        ["validate", *METHODS[opts.methods[0]], *stream_args(opts), "--data.limit", str(opts.sample)],
        work / "unedited",
        reuse=True,
    )
    results: dict = {"protocol": vars(opts), "unedited": unedited["metrics"], "runs": {}}
    if (out / "long_stream.json").exists():  # runs of earlier invocations (one method at a time) stay in the table
        results["runs"] = json.loads((out / "long_stream.json").read_text()).get("runs", {})
    for name in opts.methods:
        run_method(name, opts, work / name, out, results)
    finished = [work / name for name in results["runs"] if (work / name / "summary.json").exists()]
    if len(finished) > 1:  # one run's report is already in out/<name>
        write_report(finished, out / "all")
    print((out / "long_stream.md").read_text(), f"wrote {out}", sep="\n")


if __name__ == "__main__":
    main()
