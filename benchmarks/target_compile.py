"""Would ``torch.compile`` pay in the target optimisation? Seconds per iteration, eager against compiled, one process.

Half of a bfloat16 target iteration is elementwise work (RMSNorm's float32 upcast, SiLU, rotary, their backward;
docs/benchmarks.md), the kind inductor fuses. This runs :func:`editing.locate.compute_targets` on ``--requests``
requests of the long stream through three bfloat16 copies of the embedded model (``target_precision: bfloat16``):

- ``eager``: as the project runs it;
- ``norms+mlp``: every RMSNorm and MLP above the last edited layer ``torch.compile``'d (``dynamic=True``: the suffix
  buckets change shape every iteration);
- ``blocks``: every decoder block's ``forward`` compiled (its hooks stay eager, as :func:`editing.forward.blocks_from`
  hooks the first one anew on every call).

Seconds per iteration are the difference between ``1 + --iterations`` iterations and 1 (every request runs every
iteration), so the once-per-step capture and prefix passes drop out. The three alternate ``--repeats`` times after a
warm-up call that compiles; the median of each, its ratio to ``eager``, the targets' largest difference from
``eager``'s and the number of graphs dynamo compiled are printed and written as JSON.

    python benchmarks/target_compile.py --out docs/benchmarks/target_compile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch._dynamo.utils as dynamo_utils
from cli_runs import DATA, REPO
from transformers import PreTrainedModel

from editing.locate import compute_targets, generate_context_templates
from editing.models import architecture_of, default_mlp_layers, load_model, reduced_precision_copy
from editing.requests import read_requests


def compile_norms_and_mlps(runner: PreTrainedModel, layer: int) -> None:
    for block in blocks_above(runner, layer):
        for module in (block.input_layernorm, block.post_attention_layernorm, block.mlp):
            module.compile(dynamic=True)
    runner.base_model.norm.compile(dynamic=True)


def compile_blocks(runner: PreTrainedModel, layer: int) -> None:
    for block in blocks_above(runner, layer):
        block.forward = torch.compile(block.forward, dynamic=True)
    runner.base_model.norm.compile(dynamic=True)


def blocks_above(runner: PreTrainedModel, layer: int) -> list[torch.nn.Module]:
    return list(runner.get_submodule(architecture_of(runner).blocks))[layer + 1 :]


VARIANTS: dict[str, Callable[[PreTrainedModel, int], None] | None] = {
    "eager": None,
    "norms+mlp": compile_norms_and_mlps,
    "blocks": compile_blocks,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA / "counterfact_easyedit_train.json"))
    parser.add_argument("--requests", type=int, default=100, help="requests per step (the papers' protocol: 100)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/target_compile.json")
    opts = parser.parse_args()
    model, tokenizer = load_model()
    requests = read_requests(opts.data, "easyedit", limit=opts.requests)
    templates = generate_context_templates(model, tokenizer)
    layer = default_mlp_layers(model)[-1]
    runners = {}
    for name, prepare in VARIANTS.items():
        runners[name] = reduced_precision_copy(model, torch.bfloat16)
        if prepare is not None:
            prepare(runners[name], layer)

    def run(name: str, steps: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        never_stop = -1.0  # below any loss: every request runs every iteration
        result = compute_targets(
            model, tokenizer, requests, layer, templates, steps=steps, stop_loss=never_stop, runner=runners[name]
        )
        return time.perf_counter() - start, result.z

    report: dict = {"requests": opts.requests, "iterations": opts.iterations, "variants": {}}
    z = {}
    for name in VARIANTS:
        before = dict(dynamo_utils.counters["stats"])
        warm_up, _ = run(name, 3)
        report["variants"][name] = {"warm_up_seconds": warm_up, "per_iteration_seconds": []}
        graphs = dynamo_utils.counters["stats"].get("unique_graphs", 0) - before.get("unique_graphs", 0)
        report["variants"][name]["compiled_graphs"] = graphs
        print(f"{name}: warm-up {warm_up:.1f} s, {graphs} graphs", flush=True)
    for _ in range(opts.repeats):
        for name in VARIANTS:
            one, _ = run(name, 1)
            more, z[name] = run(name, 1 + opts.iterations)
            report["variants"][name]["per_iteration_seconds"].append((more - one) / opts.iterations)
    eager = statistics.median(report["variants"]["eager"]["per_iteration_seconds"])
    print("| variant | s / iteration | speed-up | max target difference | graphs |\n|---|---|---|---|---|")
    for name, row in report["variants"].items():
        row["median_seconds"] = statistics.median(row["per_iteration_seconds"])
        row["speed_up"] = eager / row["median_seconds"]
        row["max_target_difference"] = float((z[name] - z["eager"]).abs().max())
        print(f"| {name} | {row['median_seconds']:.3f} | {row['speed_up']:.2f}x | "
              f"{row['max_target_difference']:.3g} | {row['compiled_graphs']} |")  # fmt: skip
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
