"""Tests for editing.methods.ft (FT-L, ROME's constrained fine-tuning baseline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from editing.methods import FineTune
from editing.metrics import score_targets
from main import cli_main

REPO = Path(__file__).resolve().parents[2]


def _prob(model, tokenizer, request) -> float:
    return float(torch.exp(-score_targets(model, tokenizer, [request.text], [request.target_new]).nll[0]))


def test_one_edit_raises_target_probability_within_the_linf_ball_on_one_layer(
    tiny_llama, char_tokenizer, tiny_requests, bind
):
    method = bind(FineTune(layer=2, lr=0.05, steps=15, norm_constraint=0.05, stop_loss=0.0), tiny_llama)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    request = tiny_requests[0]
    p_before = _prob(tiny_llama, char_tokenizer, request)

    with torch.no_grad():  # as inside ClosedFormStep.step
        method.apply([request], method.prepare([request]))

    assert _prob(tiny_llama, char_tokenizer, request) > 5 * p_before  # a 5-token target: small, but 5x likelier
    (name,) = method.edited_weights()
    assert name == "model.layers.2.mlp.down_proj"
    after = tiny_llama.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{name}.weight"}
    change = after[f"{name}.weight"] - before[f"{name}.weight"]
    assert change.abs().max() <= 0.05 + 1e-6
    assert change.abs().max() > 0.04  # the bound is active, so the clamp is what holds it
    assert not any(p.requires_grad for p in tiny_llama.parameters()) and all(
        p.grad is None for p in tiny_llama.parameters()
    )
    assert set(method.timings) == {"targets", "keys", "solve"} and method.timings["solve"] > 0
    assert set(method.step_log()) == {"train/ft_loss", "train/ft_steps"}


def test_original_box_is_against_the_original_weight_across_steps(tiny_gpt2, char_tokenizer, tiny_requests, bind):
    method = bind(FineTune(layer=1, lr=0.05, steps=10, norm_constraint=0.02, stop_loss=0.0, box="original"), tiny_gpt2)
    (weight,) = method.edited_weights().values()
    original = weight.parameter.detach().clone()
    for request in tiny_requests:  # sequential edits: the budget does not reset per edit
        with torch.no_grad():
            method.apply([request], method.prepare([request]))
    assert (weight.parameter - original).abs().max() <= 0.02 + 1e-6


def test_per_edit_box_is_anchored_at_the_start_of_each_edit(tiny_gpt2, char_tokenizer, tiny_requests, bind):
    """ROME's FT-L: each edit stays within the bound of the weights it started from; the cumulative change grows."""
    method = bind(FineTune(layer=1, lr=0.05, steps=10, norm_constraint=0.02, stop_loss=0.0), tiny_gpt2)
    (weight,) = method.edited_weights().values()
    original = weight.parameter.detach().clone()
    for request in tiny_requests:
        start = weight.parameter.detach().clone()
        with torch.no_grad():
            method.apply([request], method.prepare([request]))
        assert (weight.parameter - start).abs().max() <= 0.02 + 1e-6
    assert (weight.parameter - original).abs().max() > 0.02 + 1e-4


def test_unconstrained_fine_tuning_moves_further(tiny_llama, char_tokenizer, tiny_requests, bind):
    method = bind(FineTune(layer=2, lr=0.05, steps=10, norm_constraint=None, stop_loss=0.0), tiny_llama)
    (weight,) = method.edited_weights().values()
    original = weight.parameter.detach().clone()
    with torch.no_grad():
        method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert (weight.parameter - original).abs().max() > 0.1


def test_bfloat16_model_trains_through_a_float32_master_copy(tiny_llama, char_tokenizer, tiny_requests, bind):
    model = tiny_llama.to(torch.bfloat16)
    method = bind(FineTune(layer=2, lr=0.05, steps=15, norm_constraint=0.05, stop_loss=0.0), model)
    (weight,) = method.edited_weights().values()
    original = weight.parameter.detach().clone()
    request = tiny_requests[0]
    p_before = _prob(model, char_tokenizer, request)
    with torch.no_grad():
        method.apply([request], method.prepare([request]))
    assert weight.parameter.dtype == torch.bfloat16
    assert _prob(model, char_tokenizer, request) > 5 * p_before
    assert (weight.parameter.float() - original.float()).abs().max() <= 0.05 + 2**-7  # bound + bfloat16 rounding


def test_default_layer_and_early_stop(tiny_llama, char_tokenizer, tiny_requests, bind):
    method = bind(FineTune(lr=0.05, steps=50, norm_constraint=None, stop_loss=100.0), tiny_llama)
    assert method.layer == 2  # the middle of default_mlp_layers: blocks 1, 2, 3 of 4
    with torch.no_grad():
        method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert method.step_log()["train/ft_steps"] == 0  # the loss was already below stop_loss


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"norm_constraint": -1.0}, "norm_constraint"),
        ({"layer": -1}, "layer"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        FineTune(**kwargs)


def test_cli_run_with_the_condition_number_monitor(tmp_path, tiny_llama, char_tokenizer, tiny_requests):
    """configs/ft.yaml end to end on the tiny model, with the monitor keeping its own originals (no PRUNE)."""
    tiny_llama.save_pretrained(tmp_path / "model")
    char_tokenizer.save_pretrained(tmp_path / "model")
    records = [
        {"case_id": r.case_id, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
         "target_true": r.target_true}
        for r in tiny_requests
    ]  # fmt: skip
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    root = tmp_path / "run"
    cli_main(
        [
            "fit",
            "--config", str(REPO / "configs" / "ft.yaml"),
            "--model.model_name", str(tmp_path / "model"),
            "--model.cache_dir", str(tmp_path / "cache"),
            "--model.method.init_args.layer", "1",
            "--model.method.init_args.lr", "0.05",
            "--model.method.init_args.steps", "5",
            "--model.method.init_args.norm_constraint", "0.05",
            "--data.path", str(tmp_path / "edits.jsonl"),
            "--data.edits_per_step", "1",
            "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks+=callbacks.ConditionNumberMonitor",
        ]
    )  # fmt: skip
    summary = json.loads((root / "summary.json").read_text())
    assert summary["method"] == "FineTune" and summary["protocol"]["total_edits"] == 3
    assert set(summary["timing"]["split"]) == {"targets", "keys", "solve"}
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    weight = checkpoint["state_dict"]["model.model.layers.1.mlp.down_proj.weight"]
    assert [k for k in checkpoint["state_dict"] if k.startswith("model.")] == [
        "model.model.layers.1.mlp.down_proj.weight"
    ]
    original = tiny_llama.state_dict()["model.layers.1.mlp.down_proj.weight"]
    assert 0 < (weight - original).abs().max() <= 3 * 0.05 + 1e-6  # three edits, each in a fresh 0.05 box (per_edit)
    rows = list(csv.DictReader(next(root.glob("csv/version_*/metrics.csv")).open()))
    assert {"train/ft_loss", "spectral/layer_01/kappa", "spectral/layer_01/delta_fro"} <= set(rows[0])
    s = torch.linalg.svdvals(weight.double())
    assert summary["spectral"]["layer_01/kappa"] == pytest.approx(float(s[0] / s[-1]), rel=1e-5)
    assert summary["spectral"]["layer_01/delta_fro"] == pytest.approx(float((weight - original).norm()), rel=1e-4)
    assert "restrained" not in " ".join(summary["spectral"])  # no PRUNE in this run
