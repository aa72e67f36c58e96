"""Tests for editing.methods.ft (FT-L, ROME's constrained fine-tuning baseline)."""

from __future__ import annotations

import pytest
import torch

from editing.methods import FineTune
from editing.metrics import score_targets


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


def test_constraint_is_against_the_original_weight_across_steps(tiny_gpt2, char_tokenizer, tiny_requests, bind):
    method = bind(FineTune(layer=1, lr=0.05, steps=10, norm_constraint=0.02, stop_loss=0.0), tiny_gpt2)
    (weight,) = method.edited_weights().values()
    original = weight.parameter.detach().clone()
    for request in tiny_requests:  # sequential edits: the budget does not reset per edit
        with torch.no_grad():
            method.apply([request], method.prepare([request]))
    assert (weight.parameter - original).abs().max() <= 0.02 + 1e-6


def test_unconstrained_fine_tuning_moves_further(tiny_llama, char_tokenizer, tiny_requests, bind):
    method = bind(FineTune(layer=2, lr=0.05, steps=10, norm_constraint=None, stop_loss=0.0), tiny_llama)
    (weight,) = method.edited_weights().values()
    original = weight.parameter.detach().clone()
    with torch.no_grad():
        method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert (weight.parameter - original).abs().max() > 0.1


def test_default_layer_and_early_stop(tiny_llama, char_tokenizer, tiny_requests, bind):
    method = bind(FineTune(lr=0.05, steps=50, norm_constraint=None, stop_loss=100.0), tiny_llama)
    assert method.layer == 1  # middle of default_mlp_layers (blocks 1-3 of 4)
    with torch.no_grad():
        method.apply(tiny_requests[:1], method.prepare(tiny_requests[:1]))
    assert method.step_log()["train/ft_steps"] == 0  # the loss was already below stop_loss


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"lr": 0.0}, "lr"), ({"steps": 0}, "steps"), ({"norm_constraint": -1.0}, "norm_constraint"), ({"layer": -1}, "layer")],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        FineTune(**kwargs)
