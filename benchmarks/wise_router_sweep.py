"""Which block and which routing score let WISE's router tell edits and paraphrases from unrelated inputs?

A measurement on the unedited model, before any training: for every MLP down projection of the model, the inputs
``a_t`` of the projection on the edit rows (prompt + new target), their paraphrases and the unrelated locality
probes (prompt + answer), as the router and ``RoutingMonitor`` see them. A memory that holds T edits has a task vector
close to ``tau = sum_e u_e v_e^T`` (one rank-one update per edit, ``v_e`` the edit's mean projection input and ``u_e``
directions in the output space, taken orthonormal here), so a row's score ``mean_t ||tau a_t||`` is
``mean_t sqrt(sum_e (v_e . a_t)^2)``; the threshold is the lowest score of the T edit rows (slack 1). The sweep reports,
per block and score variant, the share of paraphrases routed (what generalization needs: high) and of unrelated
probes routed (what locality needs: zero), and the mean AUC between each edit's own paraphrases and all unrelated rows.

Variants: ``paper`` (the raw inputs, the paper's score), ``centred`` (inputs minus their mean over the irrelevant pool
of model-sampled sentences; an extension the paper did not evaluate), each pooled over a row's tokens by the mean (the
paper) or the maximum (``-max``: the release's rule for long inputs, ``long_input_max: 0`` applies it to every row).

    python benchmarks/wise_router_sweep.py --records builtin --limit 30
    python benchmarks/wise_router_sweep.py --records ../shared/data/zsre_eval.json --limit 100 --out DIR/zsre.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from cli_runs import REPO

sys.path.insert(0, str(REPO))
from editing.corpus import SAMPLE_SEEDS  # noqa: E402
from editing.forward import capture  # noqa: E402
from editing.models import EMBEDDED_MODEL, architecture_of, load_model, sample_text  # noqa: E402
from editing.requests import builtin_requests, read_requests  # noqa: E402
from editing.rows import encode_rows  # noqa: E402


def token_inputs(model, tokenizer, texts: list[str], modules: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per module, per text: the ``(tokens, d_ff)`` inputs of the projection at the text's real tokens."""
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for start in range(0, len(texts), 32):
        batch = texts[start : start + 32]
        rows = encode_rows(tokenizer, batch, None, None, device=model.device)
        found = capture(model, rows, {m: "input" for m in modules})
        mask = rows.attention_mask.bool()
        for m in modules:
            out[m] += [found[m][i][mask[i]].float() for i in range(len(batch))]
    return out


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def sweep_module(
    inputs: dict[str, list[torch.Tensor]], mean: torch.Tensor | None, owners: list[int], peak: bool
) -> dict:
    """Routing shares and AUC for one module (``mean``: the centring vector, ``None`` for the paper's score; ``peak``:
    a row's highest token score instead of the mean over its tokens)."""

    def centred(a: torch.Tensor) -> torch.Tensor:
        return a - mean if mean is not None else a

    def pool(per_token: torch.Tensor) -> float:
        return float(per_token.max() if peak else per_token.mean())

    v = torch.stack([centred(a).mean(0) for a in inputs["edit"]])  # (T, d_ff): one direction per edit
    v = v / v.norm(dim=1, keepdim=True)
    # every row's tokens projected on every edit's direction, once: (tokens, T) per row
    projected = {kind: [centred(a) @ v.T for a in rows] for kind, rows in inputs.items()}

    def scores(kind: str) -> torch.Tensor:
        return torch.tensor([pool(p.norm(dim=1)) for p in projected[kind]])

    s_edit, s_para, s_unrel = scores("edit"), scores("paraphrase"), scores("unrelated")
    threshold = float(s_edit.min())
    # one edit alone: its own paraphrases against every unrelated row, scored by its own direction
    aucs = []
    for e in range(len(v)):
        own = [i for i, o in enumerate(owners) if o == e]
        if not own:
            continue
        para = torch.tensor([pool(projected["paraphrase"][i][:, e].abs()) for i in own])
        unrel = torch.tensor([pool(p[:, e].abs()) for p in projected["unrelated"]])
        aucs.append(auc(para, unrel))
    return {
        "paraphrase_routed": float((s_para > threshold).float().mean()),
        "unrelated_routed": float((s_unrel > threshold).float().mean()),
        "unrelated_q90_over_threshold": float(s_unrel.quantile(0.9) / threshold),
        "single_edit_auc": sum(aucs) / len(aucs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="builtin", help="'builtin' or a ZsRE/CounterFact file")
    parser.add_argument("--limit", type=int, default=30, help="edits held by the memory (T)")
    parser.add_argument("--pool-size", type=int, default=100, help="model-sampled sentences for the centring mean")
    parser.add_argument("--out", default="docs/benchmarks/wise_router_sweep_builtin.json")
    opts = parser.parse_args()
    if opts.records == "builtin":
        requests = builtin_requests(opts.limit)
    else:
        requests = read_requests(opts.records, "auto", opts.limit)
    model, tokenizer = load_model(EMBEDDED_MODEL)
    arch = architecture_of(model)
    n_blocks = len(model.get_submodule(arch.blocks))
    modules = [arch.mlp_out.format(i) for i in range(1, n_blocks)]
    texts = {
        "edit": [f"{r.text} {r.target_new}" for r in requests],
        "paraphrase": [f"{p} {r.target_new}" for r in requests for p in r.rephrase_prompts],
        "unrelated": [f"{p.prompt} {p.answer}" for r in requests for p in r.locality],
    }
    owners = [e for e, r in enumerate(requests) for _ in r.rephrase_prompts]
    prompts = [SAMPLE_SEEDS[i % len(SAMPLE_SEEDS)] for i in range(opts.pool_size)]
    pool = [t.strip() for t in sample_text(model, tokenizer, prompts, 20, 1, top_k=50)]
    with torch.no_grad():
        inputs = {kind: token_inputs(model, tokenizer, t, modules) for kind, t in texts.items()}
        pool_inputs = token_inputs(model, tokenizer, pool, modules)
    rows = {}
    for block, m in zip(range(1, n_blocks), modules, strict=True):
        per_kind = {kind: inputs[kind][m] for kind in texts}
        mean = torch.cat(pool_inputs[m]).mean(0)
        rows[block] = {
            f"{name}{'-max' if peak else ''}": sweep_module(per_kind, centre, owners, peak)
            for name, centre in (("paper", None), ("centred", mean))
            for peak in (False, True)
        }
        cells = [
            f"{k} {v['paraphrase_routed']:.2f}/{v['unrelated_routed']:.2f}/{v['single_edit_auc']:.2f}"
            for k, v in rows[block].items()
        ]
        print(block, " | ".join(cells), flush=True)
    out = REPO / opts.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": vars(opts), "edits": len(requests), "blocks": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
