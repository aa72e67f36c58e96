"""The target tokens' log-probabilities, forward and backward: ``token_log_probs`` against the full-vocabulary
log-softmax and gather it replaced, in one process, at the target optimisation's shape.

Both paths run the embedded model's LM head on the same hidden states (``--rows`` target positions: 100 requests x
6 rows (the bare prompt and 5 context templates) x 1.09 target tokens, the first 100 records of the long stream),
take one id's log-probability per row, sum, and run the backward pass to the hidden states, in float32 and in
bfloat16 (the model in that dtype, as the frozen copy of ``target_precision: bfloat16``). The two paths alternate
``--repeats`` times and the median of each is reported with their ratio, so the machine's noise falls on both alike.
Prints a table and writes JSON.

    python benchmarks/token_log_probs.py --out docs/benchmarks/token_log_probs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from cli_runs import REPO
from transformers import PreTrainedModel

from editing.forward import log_softmax_at, token_log_probs
from editing.models import DTYPES, load_model, precision_runner

LogProbPath = Callable[[PreTrainedModel, torch.Tensor, torch.Tensor], torch.Tensor]
PATHS: dict[str, LogProbPath] = {
    "log_softmax + gather": lambda m, h, ids: log_softmax_at(m, h).gather(1, ids[:, None])[:, 0],
    "token_log_probs": lambda m, h, ids: token_log_probs(m, h, ids)[0],
}


def measure(model: PreTrainedModel, rows: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of a forward and backward of each path (alternated), their ratio and the largest
    difference of the two gradients."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, model.config.hidden_size, generator=generator).to(model.dtype).requires_grad_()
    ids = torch.randint(model.config.vocab_size, (rows,), generator=generator)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    grads = {}
    for repeat in range(repeats + 1):  # the first round warms up and is not timed
        for name, path in PATHS.items():
            start = time.perf_counter()
            path(model, hidden, ids).sum().backward()
            if repeat:
                times[name].append(time.perf_counter() - start)
            grads[name], hidden.grad = hidden.grad.float(), None
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    baseline, new = ms["log_softmax + gather"], ms["token_log_probs"]
    difference = (grads["token_log_probs"] - grads["log_softmax + gather"]).abs().max().item()
    return {**ms, "speed-up": baseline / new, "max_grad_difference": difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=654, help="target positions (100 requests x 6 rows x 1.09 tokens)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--out", default="docs/benchmarks/token_log_probs.json")
    opts = parser.parse_args()
    model, _ = load_model()
    report = {"protocol": vars(opts), "torch_threads": torch.get_num_threads(), "results": {}}
    for precision in opts.precisions:
        runner = precision_runner(model, precision) or model
        report["results"][precision] = measure(runner, opts.rows, opts.repeats)
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{opts.rows} target positions, vocabulary {model.config.vocab_size}, median of {opts.repeats}:")
    print("| precision | log_softmax + gather ms | token_log_probs ms | speed-up | max gradient difference |")
    print("|---|---|---|---|---|")
    for precision, r in report["results"].items():
        cells = [f"{r['log_softmax + gather']:.0f}", f"{r['token_log_probs']:.0f}", f"{r['speed-up']:.2f}x"]
        print(f"| {precision} | " + " | ".join(cells) + f" | {r['max_grad_difference']:.1e} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
