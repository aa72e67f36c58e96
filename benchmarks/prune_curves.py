"""PRUNE on a long sequential MEMIT (or FT) stream: kappa, efficacy, specificity and held-out perplexity against the
number of edits, with and without the restraint, from one editing run.

PRUNE's paper protocol (``posthoc``) edits the unrestrained weights and only evaluates restrained ones, so the editing
trajectory is the same with and without it (tested bit for bit). One ``fit`` run therefore gives both curves:

1. ``main.py fit`` with MEMIT, one edit per step, ``PruneRestraint`` (posthoc), ``ConditionNumberMonitor`` and
   ``HeldOutPerplexity``, evaluated every ``--every`` edits (these evaluations see the **restrained** weights) and
   checkpointed at the same steps;
2. ``main.py validate`` of every checkpoint without PRUNE (the **unrestrained** weights at that point);
3. kappa of the restrained matrices recomputed from each checkpoint (the monitor logs the unrestrained ones).

Writes ``curves.json``, ``prune_curves.png`` and an offline W&B run with both series under ``--out``.

    pip install -e ".[bench]"    # matplotlib, for the plots
    python benchmarks/prune_curves.py --limit 200 --every 40 --mom2-weight 100 --out runs/prune_curves
    python benchmarks/prune_curves.py --method ft --ft-lr 1e-3 --limit 100 --every 20 --out runs/prune_curves_ft
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli_runs import DATA, REPO, run_cli  # noqa: E402

from editing.spectral import LogBase, restrain  # noqa: E402

PRUNE_KEY = "PruneRestraint"
SERIES = ("efficacy", "generalization", "specificity", "locality", "perplexity")


def _log_base(text: str) -> LogBase:
    """``--log-base``: ``e`` or ``linear`` as given, anything else as a number."""
    return text if text in ("e", "linear") else float(text)


def fit_config(opts: argparse.Namespace, root: Path) -> dict:
    """MEMIT + (perplexity, PRUNE, monitor) in that order: perplexity must run while PRUNE's weights are swapped in."""
    return {
        "trainer": {
            "default_root_dir": str(root / "fit"),
            "val_check_interval": opts.every,
            "callbacks": [
                {"class_path": "callbacks.HeldOutPerplexity", "init_args": {"tokens": opts.ppl_tokens}},
                {"class_path": "callbacks.PruneRestraint", "init_args": {"mode": "posthoc", "log_base": opts.log_base}},
                {"class_path": "callbacks.ConditionNumberMonitor", "init_args": {"every_n_steps": 1}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "fit" / "every"),
                        "filename": "{step}",
                        "every_n_train_steps": opts.every,
                        "save_top_k": -1,
                    },
                },
            ],
        },
        "model": {"method": method_config(opts)},
        "data": {
            "path": str(DATA / "counterfact.json"),
            "format": "counterfact",
            "limit": opts.limit,
            "edits_per_step": 1,
        },
    }


def method_config(opts: argparse.Namespace) -> dict:
    if opts.method == "memit":
        return {
            "class_path": "editing.methods.MEMIT",
            "init_args": {"layers": [3, 4, 5, 6, 7], "mom2_weight": opts.mom2_weight},
        }
    return {
        "class_path": "editing.methods.FineTune",
        "init_args": {"layer": 5, "lr": opts.ft_lr, "steps": 25, "norm_constraint": opts.ft_norm_constraint},
    }


def method_args(opts: argparse.Namespace) -> list[str]:
    """The same method as ``method_config``, as CLI flags (for ``validate``)."""
    config = method_config(opts)
    args = ["--model.method", config["class_path"]]
    for key, value in config["init_args"].items():
        args += [f"--model.method.init_args.{key}", json.dumps(value)]
    return args


def checkpoint_weights(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original and current value of every edited matrix in a checkpoint of the run."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    entry = next(v for k, v in ckpt["callbacks"].items() if k.startswith(PRUNE_KEY))
    originals = entry["originals"]
    return originals, {name: ckpt["state_dict"][f"model.{name}.weight"] for name in originals}


def spectral_point(
    originals: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], log_base: LogBase
) -> dict[str, dict[str, float]]:
    """Per edited matrix: kappa of ``W_n`` and of PRUNE's ``W + U F(S) V^T``, ``||W_n - W||_2``, the restrained count
    and the seconds the restraint took."""
    out = {}
    for name, original in originals.items():
        current = weights[name]
        sigma_max = float(torch.linalg.matrix_norm(original.double(), ord=2))
        start = time.perf_counter()
        restrained, count = restrain(original, current, sigma_max, log_base)
        seconds = time.perf_counter() - start
        layer = name.split(".")[2]
        for label, w in (("unrestrained", current.double()), ("restrained", restrained)):
            s = torch.linalg.svdvals(w)
            out.setdefault(layer, {})[f"kappa_{label}"] = float(s.max() / s.min())
        out[layer]["restrained_values"] = count
        out[layer]["restraint_seconds"] = seconds
        out[layer]["delta_2"] = float(torch.linalg.matrix_norm((current.double() - original.double()), ord=2))
    return out


def validate(opts: argparse.Namespace, root: Path, checkpoint: Path | None) -> dict[str, float]:
    """``main.py validate`` of a checkpoint (or of the unedited model) without PRUNE: the unrestrained metrics."""
    args = [
        "validate", *method_args(opts),
        "--data.path", str(DATA / "counterfact.json"), "--data.format", "counterfact",
        "--data.limit", str(opts.limit), "--data.edits_per_step", "1",
        "--trainer.callbacks+=callbacks.HeldOutPerplexity",
        "--trainer.callbacks.tokens", str(opts.ppl_tokens),
        *(["--ckpt_path", str(checkpoint)] if checkpoint else []),
    ]  # fmt: skip
    return run_cli(args, root, opts.reuse)["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="CounterFact edits, one per step")
    parser.add_argument("--every", type=int, default=40, help="evaluate and checkpoint every this many edits")
    parser.add_argument("--method", choices=["memit", "ft"], default="memit")
    parser.add_argument("--mom2-weight", type=float, default=15000.0, help="MEMIT's lambda")
    parser.add_argument("--ft-lr", type=float, default=5e-4, help="FT-L's Adam learning rate")
    parser.add_argument("--ft-norm-constraint", type=float, default=None, help="FT-L's L-inf bound (default: none)")
    parser.add_argument(
        "--log-base", type=_log_base, default="e", help="PRUNE's log base (the paper's alpha): e, a number > 1, linear"
    )
    parser.add_argument("--ppl-tokens", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "prune_curves")
    parser.add_argument("--reuse", action="store_true", help="skip the fit / validate runs whose outputs exist")
    opts = parser.parse_args()
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit('the plots need matplotlib: pip install -e ".[bench]"')
    if not (DATA / "counterfact.json").exists():
        sys.exit(f"needs {DATA / 'counterfact.json'}")
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "fit.yaml"
    config.write_text(yaml.safe_dump(fit_config(opts, out), sort_keys=False))

    reused = opts.reuse and (out / "fit" / "summary.json").exists()
    start = time.perf_counter()
    fit_summary = run_cli(["fit", "--config", str(config)], out / "fit", opts.reuse)
    fit_seconds = time.perf_counter() - start
    if reused:  # the wall time the original run recorded
        previous = out / "curves.json"
        fit_seconds = json.loads(previous.read_text()).get("fit_seconds") if previous.exists() else None
    restrained_history = {int(h["edits"]): h for h in fit_summary["history"]}

    checkpoints = sorted((out / "fit" / "every").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    originals, _ = checkpoint_weights(checkpoints[0])
    unedited = validate(opts, out / "validate_0", None)  # before the first edit: all requests, unedited model
    points = [
        {
            "edits": 0,
            "unrestrained": unedited,
            "restrained": unedited,  # W_0 - W = 0: nothing to restrain
            "spectral": spectral_point(originals, originals, opts.log_base),
        }
    ]
    for ckpt in checkpoints:
        edits = int(ckpt.stem.split("=")[1])
        points.append(
            {
                "edits": edits,
                "unrestrained": validate(opts, out / f"validate_{edits}", ckpt),
                "restrained": restrained_history.get(edits, {}).get("metrics", {}),
                "spectral": spectral_point(*checkpoint_weights(ckpt), opts.log_base),
            }
        )
    result = {
        "protocol": f"{describe(opts)} on SmolLM2-135M, {opts.limit} CounterFact edits, "
        f"one per step; PRUNE posthoc log_base={opts.log_base}; evaluated every {opts.every} edits on all edits so far",
        "fit_seconds": fit_seconds,
        "seconds_per_edit": fit_summary.get("timing", {}),
        "points": points,
    }
    (out / "curves.json").write_text(json.dumps(result, indent=2))
    print_table(points)
    plot(points, out / "prune_curves.png", result["protocol"])
    log_wandb(points, out)


def describe(opts: argparse.Namespace) -> str:
    if opts.method == "memit":
        return f"MEMIT (lambda {opts.mom2_weight:g}, layers 3-7)"
    return f"FT (layer 5, Adam lr {opts.ft_lr:g}, 25 steps, L-inf bound {opts.ft_norm_constraint})"


def print_table(points: list[dict]) -> None:
    layer = max(points[0]["spectral"], key=int)  # the last edited layer
    header = f"kappa L{layer} raw/PRUNE"
    print(f"{'edits':>6} | {header:>20} | " + " | ".join(f"{s[:11]:>17}" for s in SERIES))
    for p in points:
        k = p["spectral"][layer]
        cells = [
            f"{p['unrestrained'].get(s, float('nan')):7.3f}/{p['restrained'].get(s, float('nan')):<8.3f}"
            for s in SERIES
        ]
        print(f"{p['edits']:>6} | {k['kappa_unrestrained']:9.2f}/{k['kappa_restrained']:<9.2f} | " + " | ".join(cells))


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edits = [p["edits"] for p in points]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    layers = sorted(points[0]["spectral"], key=int)
    for layer in layers:
        axes[0].plot(edits, [p["spectral"][layer]["kappa_unrestrained"] for p in points], "-o", label=f"L{layer}")
        axes[0].plot(edits, [p["spectral"][layer]["kappa_restrained"] for p in points], "--x", label=f"L{layer} PRUNE")
    axes[0].set_title("condition number of W_n")
    axes[0].legend(fontsize=6, ncol=2)
    for ax, key in zip(axes[1:], ("efficacy", "specificity", "locality", "perplexity"), strict=True):
        ax.plot(edits, [p["unrestrained"].get(key) for p in points], "-o", label="unrestrained")
        ax.plot(edits, [p["restrained"].get(key) for p in points], "--x", label="PRUNE")
        ax.set_title(key)
        ax.legend()
    for ax in axes:
        ax.set_xlabel("edits")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def log_wandb(points: list[dict], out: Path) -> None:
    """Both series as one offline W&B run (``wandb sync`` it to see the charts), x axis = edits."""
    import wandb

    run = wandb.init(project="lifelong-editing", name=out.name, dir=str(out), mode="offline", reinit=True)
    run.define_metric("edits")
    run.define_metric("*", step_metric="edits")
    for p in points:
        values = {"edits": p["edits"]}
        for kind in ("unrestrained", "restrained"):
            values.update({f"{kind}/{k}": v for k, v in p[kind].items() if isinstance(v, int | float)})
        for layer, spectral in p["spectral"].items():
            values.update({f"spectral/layer_{int(layer):02d}/{k}": v for k, v in spectral.items()})
        run.log(values)
    run.log({"curves": wandb.Image(str(out / "prune_curves.png"))})
    run.finish()


if __name__ == "__main__":
    main()
