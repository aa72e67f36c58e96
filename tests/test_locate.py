"""Tests for editing.locate (keys, targets), editing.rows and editing.forward (the upper-block shortcut) and
editing.models.EditedWeight."""

from __future__ import annotations

import math

import pytest
import torch

from editing.forward import blocks_from, capture, log_softmax_at, token_log_probs
from editing.locate import (
    LayerWalk,
    average_template_keys,
    compute_keys,
    compute_targets,
    essence_kl,
    layer_output_at_subject,
    spread_residual,
)
from editing.models import EditedWeight, architecture_of, reduced_precision_copy
from editing.requests import EditRequest
from editing.rows import encode_rows, target_token_ids


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _d_inner(model) -> int:
    cfg = model.config
    return cfg.intermediate_size if cfg.model_type == "llama" else (cfg.n_inner or 4 * cfg.n_embd)


# -- EditedWeight ------------------------------------------------------------------------------------------------
def test_edited_weight_orientation(tiny_model):
    w = EditedWeight(tiny_model, 2)
    assert w.get().shape == (tiny_model.config.hidden_size, _d_inner(tiny_model))
    assert w.transposed == (tiny_model.config.model_type == "gpt2")
    # get() is a view of the parameter: writing through it changes the module
    assert w.get().data_ptr() == w.parameter.data_ptr()


def test_edited_weight_add_changes_output_by_delta_x(tiny_model):
    w = EditedWeight(tiny_model, 1)
    d_out, d_in = w.get().shape
    x = torch.randn(3, d_in)
    before = w.module(x).double()
    delta = torch.randn(d_out, d_in, dtype=torch.float64) * 0.1
    w.add(delta)
    after = w.module(x).double()
    torch.testing.assert_close(after - before, x.double() @ delta.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", [4, -1, 100])
def test_edited_weight_out_of_range(tiny_model, layer):
    with pytest.raises(ValueError, match="layers"):
        EditedWeight(tiny_model, layer)


# -- encode_rows -------------------------------------------------------------------------------------------------
def test_encode_rows_positions_and_teacher_forcing(char_tokenizer):
    tok = char_tokenizer
    prompts = ["The capital of Spain is", "Ed speaks", "Nothing here"]
    subjects = ["Spain", "Ed", None]
    targets = ["Rome", "Dutch language", None]
    rows = encode_rows(tok, prompts, subjects, targets)

    assert rows.subject_pos.tolist() == [prompts[0].index("Spain") + 4, 1, -1]
    assert rows.last_prompt_pos.tolist() == [len(p) - 1 for p in prompts]
    # the byte at the subject position is the last byte of the subject
    assert rows.input_ids[0, rows.subject_pos[0]].item() == _ids(tok, "n")[0]

    full = [_ids(tok, p) + (target_token_ids(tok, t) if t else []) for p, t in zip(prompts, targets, strict=True)]
    for i, seq in enumerate(full):
        width = len(seq) - (1 if targets[i] else 0)  # the last target token is predicted, never fed
        assert rows.attention_mask[i].sum().item() == width
        assert rows.input_ids[i, :width].tolist() == seq[:width]
        assert (rows.input_ids[i, width:] == tok.pad_token_id).all()
        assert (rows.attention_mask[i, width:] == 0).all()

    r, p, ids = rows.target_positions()
    assert len(ids) == len(" Rome") + len(" Dutch language")
    for row, pos, tid in zip(r.tolist(), p.tolist(), ids.tolist(), strict=True):
        assert full[row][pos + 1] == tid  # logits at pos predict the next token of prompt + target
    assert set(r.tolist()) == {0, 1}
    assert target_token_ids(tok, " Rome ") == _ids(tok, " Rome")  # one leading space, stripped otherwise


def test_encode_rows_uses_last_occurrence_of_subject(char_tokenizer):
    rows = encode_rows(char_tokenizer, ["Ed met Ed today"], ["Ed"])
    assert rows.subject_pos.tolist() == [8]


def test_encoded_rows_select_trims(char_tokenizer):
    rows = encode_rows(char_tokenizer, ["a long prompt here", "ab", "abcd"], targets=["x", "y", "zz"])
    sub = rows.select(torch.tensor([1, 2]))
    assert sub.input_ids.shape == (2, len("abcd") + 2)  # "abcd" + " z" (last target token not fed)
    assert sub.last_prompt_pos.tolist() == [1, 3]
    torch.testing.assert_close(sub.target_ids, rows.target_ids[[1, 2]])


# -- capture / forward_until -------------------------------------------------------------------------------------
def _block(model, layer: int) -> str:
    return f"{architecture_of(model).blocks}.{layer}"


def test_capture_matches_hidden_states_and_manual_hook(tiny_model, char_tokenizer):
    rows = encode_rows(char_tokenizer, ["The capital of Spain is", "Ed speaks"], ["Spain", "Ed"])
    mlp = EditedWeight(tiny_model, 1).name
    seen = {}

    def record(module, args, output) -> None:
        seen["k"] = args[0].clone()

    handle = tiny_model.get_submodule(mlp).register_forward_hook(record)
    with torch.no_grad():
        ref = tiny_model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, output_hidden_states=True)
    handle.remove()

    got = capture(tiny_model, rows, {_block(tiny_model, 1): "output", mlp: "input"})
    torch.testing.assert_close(got[_block(tiny_model, 1)], ref.hidden_states[2])
    torch.testing.assert_close(got[mlp], seen["k"])

    at = capture(tiny_model, rows, {_block(tiny_model, 1): "output", mlp: "input"}, rows.subject_pos)
    idx = torch.arange(2)
    torch.testing.assert_close(at[_block(tiny_model, 1)], ref.hidden_states[2][idx, rows.subject_pos])
    torch.testing.assert_close(at[mlp], seen["k"][idx, rows.subject_pos])
    assert at[mlp].shape == (2, _d_inner(tiny_model))


def test_capture_in_length_buckets_equals_one_padded_batch(tiny_model, char_tokenizer):
    prompts = ["The capital of Spain is", "Ed speaks", "A", "Much longer: the mother tongue of Ed is", "Bo"]
    rows = encode_rows(char_tokenizer, prompts, ["Spain", "Ed", "A", "Ed", "Bo"])
    modules = {_block(tiny_model, 1): "output", EditedWeight(tiny_model, 1).name: "input"}
    lengths = rows.attention_mask.sum(1)
    below = _block(tiny_model, 0)
    shifted = capture(tiny_model, rows, {below: "output"})[below] + 1.0  # not the model's own: `above` must count
    for positions, above in ((None, None), (rows.subject_pos, None), (rows.subject_pos, (0, shifted))):
        one = capture(tiny_model, rows, modules, positions, above=above)
        grouped = capture(tiny_model, rows, modules, positions, length_buckets=3, above=above)
        for name in modules:
            assert grouped[name].shape == one[name].shape
            if positions is not None:
                torch.testing.assert_close(grouped[name], one[name], atol=1e-5, rtol=1e-5)
                continue
            for b, length in enumerate(lengths.tolist()):  # real positions equal (padding is not scored)
                torch.testing.assert_close(grouped[name][b, :length], one[name][b, :length], atol=1e-5, rtol=1e-5)


def test_capture_stops_after_last_module(tiny_model, char_tokenizer):
    rows = encode_rows(char_tokenizer, ["hello"])
    calls = []
    handles = [
        tiny_model.get_submodule(_block(tiny_model, 2)).register_forward_hook(
            lambda *a: calls.append("block2") and None
        ),
        tiny_model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("head") and None),
    ]
    try:
        out = capture(tiny_model, rows, {_block(tiny_model, 1): "output"})
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert out[_block(tiny_model, 1)].shape == (1, 5, tiny_model.config.hidden_size)


def test_compute_keys_is_template_average(tiny_llama, char_tokenizer, tiny_requests):
    reqs = tiny_requests[:2]
    templates = ["{}", "Hi there. {}"]
    name = EditedWeight(tiny_llama, 1).name
    K = compute_keys(tiny_llama, char_tokenizer, reqs, name, templates)
    assert K.shape == (64, 2)
    for j, r in enumerate(reqs):
        per_template = []
        for t in templates:
            text = t.replace("{}", r.text)
            rows = encode_rows(char_tokenizer, [text], [r.subject])
            per_template.append(capture(tiny_llama, rows, {name: "input"}, rows.subject_pos)[name][0])
        torch.testing.assert_close(K[:, j], torch.stack(per_template).mean(0), atol=1e-6, rtol=1e-5)


def test_release_key_averaging_weighs_the_bare_prompt_half(tiny_llama, char_tokenizer, tiny_requests):
    """With three or more templates the releases' average (bare 1/2, prefixes 1/2) differs from the flat mean."""
    reqs = tiny_requests[:2]
    templates = ["{}", "Hi there. {}", "So it goes. {}"]
    name = EditedWeight(tiny_llama, 1).name
    release = compute_keys(tiny_llama, char_tokenizer, reqs, name, templates)
    flat = compute_keys(tiny_llama, char_tokenizer, reqs, name, templates, averaging="flat")
    for j, r in enumerate(reqs):
        k = []
        for t in templates:
            rows = encode_rows(char_tokenizer, [t.replace("{}", r.text)], [r.subject])
            k.append(capture(tiny_llama, rows, {name: "input"}, rows.subject_pos)[name][0])
        torch.testing.assert_close(release[:, j], k[0] / 2 + (k[1] + k[2]) / 4, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(flat[:, j], (k[0] + k[1] + k[2]) / 3, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(release[:, j], flat[:, j], atol=1e-4)


def test_average_template_keys_by_hand():
    k = torch.tensor([[[3.0], [1.0], [5.0], [0.0]]])  # one request, four templates, d_k = 1
    assert average_template_keys(k).item() == pytest.approx((3 + (1 + 5 + 0) / 3) / 2)
    assert average_template_keys(k, "flat").item() == pytest.approx(9 / 4)
    assert average_template_keys(k[:, :1]).item() == 3.0


# -- blocks_from: skipping the lower blocks ---------------------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 2])
def test_blocks_from_reproduces_full_model(tiny_model, char_tokenizer, layer):
    rows = encode_rows(char_tokenizer, ["The capital of Spain is", "Ed speaks"], targets=["Rome", "Dutch"])
    inputs = dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    with torch.no_grad():
        full = tiny_model(**inputs).logits
        hidden = capture(tiny_model, rows, {_block(tiny_model, layer): "output"})[_block(tiny_model, layer)]
        lower_calls = []
        handle = tiny_model.get_submodule(_block(tiny_model, 0)).register_forward_hook(
            lambda *a: lower_calls.append(1) and None
        )
        blocks = tiny_model.get_submodule(architecture_of(tiny_model).blocks)
        try:
            with blocks_from(tiny_model, layer, hidden):
                assert len(tiny_model.get_submodule(architecture_of(tiny_model).blocks)) == 3 - layer
                upper = tiny_model(**inputs).logits
                shifted = hidden.clone()
                shifted[:, 3] += torch.randn_like(hidden[:, 3]) * hidden[:, 3].norm(dim=-1, keepdim=True)
            with blocks_from(tiny_model, layer, shifted):
                changed = tiny_model(**inputs).logits
        finally:
            handle.remove()
    assert lower_calls == []  # the cached hidden state replaced the lower blocks
    mask = rows.attention_mask.bool()
    torch.testing.assert_close(upper[mask], full[mask], atol=1e-5, rtol=1e-4)
    # the fed hidden state is what the upper blocks see: a shift at position 3 moves positions >= 3 only
    assert not torch.allclose(changed[:, 3:], full[:, 3:], atol=1e-4)
    torch.testing.assert_close(changed[:, :3], full[:, :3], atol=1e-5, rtol=1e-4)
    # the block list is restored
    assert tiny_model.get_submodule(architecture_of(tiny_model).blocks) is blocks and len(blocks) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_log_probs_equal_the_log_softmax_and_its_gradient(tiny_llama, dtype):
    """The fused reduction (chunks of rows, no full-vocabulary log-softmax) against the plain one, over more rows than
    one chunk."""
    head = tiny_llama if dtype == torch.float32 else reduced_precision_copy(tiny_llama, dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, tiny_llama.config.hidden_size, generator=generator, dtype=dtype)
    ids = torch.randint(tiny_llama.config.vocab_size, (70,), generator=generator)
    weights = torch.rand(70, generator=generator)
    grads, values = [], []
    for fused in (True, False):
        h = hidden.clone().requires_grad_(True)
        if fused:
            lp, hit = token_log_probs(head, h, ids)
        else:
            full = log_softmax_at(head, h)
            lp, hit = full.gather(1, ids[:, None])[:, 0], full.argmax(-1) == ids
        (lp * weights).sum().backward()
        values.append((lp.detach(), hit))
        grads.append(h.grad.float())
    assert values[0][0].dtype == torch.float32
    torch.testing.assert_close(values[0][0], values[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(values[0][1], values[1][1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[0], grads[1], atol=tol * grads[1].abs().max().item(), rtol=tol)


def test_blocks_from_rejects_top_layer(tiny_llama):
    with pytest.raises(ValueError, match="layers"):
        with blocks_from(tiny_llama, 3, torch.zeros(1, 1, 32)):
            pass
    assert len(tiny_llama.model.layers) == 4


# -- compute_targets ---------------------------------------------------------------------------------------------
def _target_nll_with_shift(model, tok, request, layer: int, z: torch.Tensor | None) -> float:
    """Mean NLL of target_new after the bare prompt, with the residual after ``layer`` at the last subject token
    replaced by ``z`` (an independent forward-hook implementation of the injection)."""
    rows = encode_rows(tok, [request.text], [request.subject], [request.target_new])
    pos = int(rows.subject_pos[0])

    def inject(module, args, output):
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        hidden = hidden.clone()
        hidden[0, pos] = z.to(hidden.dtype)
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handle = model.get_submodule(_block(model, layer)).register_forward_hook(inject) if z is not None else None
    try:
        with torch.no_grad():
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.double()
    finally:
        if handle is not None:
            handle.remove()
    r, p, ids = rows.target_positions()
    log_p = logits[r, p].log_softmax(-1)
    return float(-log_p.gather(1, ids[:, None]).mean())


def test_compute_targets_raises_target_probability_and_respects_clamp(tiny_llama, char_tokenizer, tiny_requests):
    reqs = tiny_requests[:2]
    layer, clamp = 1, 0.75
    with torch.enable_grad():
        res = compute_targets(
            tiny_llama,
            char_tokenizer,
            reqs,
            layer,
            ["{}"],
            lr=0.5,
            steps=40,
            stop_rule="argmax",
            stop_prob=0.5,
            clamp_norm_factor=clamp,
        )
    d = tiny_llama.config.hidden_size
    assert res.z.shape == (d, 2)
    assert len(res.steps) == len(res.prob) == 2
    h0 = layer_output_at_subject(tiny_llama, char_tokenizer, reqs, layer)  # (d, n), independent capture
    for j, r in enumerate(reqs):
        shift = (res.z[:, j] - h0[:, j]).norm()
        assert shift > 0
        assert shift <= clamp * h0[:, j].norm() + 1e-4
        before = _target_nll_with_shift(tiny_llama, char_tokenizer, r, layer, None)
        after = _target_nll_with_shift(tiny_llama, char_tokenizer, r, layer, res.z[:, j])
        assert after < before - 0.3, (before, after)
        if res.steps[j] < 40:  # stopped early: the recorded probability is that of the returned z
            assert res.prob[j] >= 0.5
            assert res.prob[j] == pytest.approx(float(torch.tensor(-after).exp()), rel=1e-3)
    # the model is untouched and no gradient flag leaked into it
    assert not any(p.requires_grad for p in tiny_llama.parameters())
    assert len(tiny_llama.model.layers) == 4


def test_compute_targets_with_a_bfloat16_runner_reach_the_target_in_the_float32_model(
    tiny_llama, char_tokenizer, tiny_requests
):
    """The upper blocks may run in reduced precision: the returned targets still do their job in the real model."""
    reqs, layer = tiny_requests[:2], 1
    runner = reduced_precision_copy(tiny_llama, torch.bfloat16)
    assert runner.model.layers[2].mlp.down_proj.weight.dtype == torch.bfloat16
    assert tiny_llama.model.layers[2].mlp.down_proj.weight.dtype == torch.float32  # the model is not touched
    with torch.enable_grad():
        res = compute_targets(
            tiny_llama, char_tokenizer, reqs, layer, ["{}"], steps=40, stop_rule="argmax", stop_prob=0.5, runner=runner
        )
    assert res.z.dtype == torch.float32
    for j, r in enumerate(reqs):
        before = _target_nll_with_shift(tiny_llama, char_tokenizer, r, layer, None)
        after = _target_nll_with_shift(tiny_llama, char_tokenizer, r, layer, res.z[:, j])
        assert after < before - 0.3, (before, after)


def test_compute_targets_clamp_binds(tiny_llama, char_tokenizer, tiny_requests):
    reqs = tiny_requests[:1]
    with torch.enable_grad():
        res = compute_targets(tiny_llama, char_tokenizer, reqs, 1, ["{}"], lr=1.0, steps=5, clamp_norm_factor=0.05)
    h0 = layer_output_at_subject(tiny_llama, char_tokenizer, reqs, 1)[:, 0]
    assert (res.z[:, 0] - h0).norm() == pytest.approx(0.05 * float(h0.norm()), rel=1e-4)


def test_essence_kl_direction_on_hand_made_distributions():
    edited, original = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    kl_edited_first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p_edited || p_original) = 0.5108
    kl_original_first = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(p_original || p_edited) = 0.3681
    assert essence_kl(edited, original).item() == pytest.approx(kl_edited_first, rel=1e-5)
    assert essence_kl(edited, original, "last_token").item() == pytest.approx(kl_original_first, rel=1e-5)


@pytest.mark.parametrize("variant", ["release", "last_token"])
def test_kl_is_taken_at_the_subject_or_the_last_token_of_the_essence_prompt(
    tiny_llama, char_tokenizer, monkeypatch, variant
):
    """Release: the subject's last token of "{subject} is a"; last_token: its last token (the shift is 0 at the first
    iteration, so both distributions passed to the KL are the unedited model's at that position)."""
    import editing.locate as locate

    seen = []

    def recording(edited, original, v):
        seen.append((edited.detach(), original.detach(), v))
        return essence_kl(edited, original, v)

    monkeypatch.setattr(locate, "essence_kl", recording)
    request = EditRequest(case_id="x", prompt="The capital of {} is", subject="Spain", target_new="Rome")
    with torch.enable_grad():
        compute_targets(tiny_llama, char_tokenizer, [request], 1, ["{}"], steps=1, kl_variant=variant)
    rows = encode_rows(char_tokenizer, ["Spain is a"], ["Spain"])
    with torch.no_grad():
        log_p = tiny_llama(input_ids=rows.input_ids).logits[0].float().log_softmax(-1)
    pos = int(rows.subject_pos[0]) if variant == "release" else int(rows.last_prompt_pos[0])
    other = int(rows.last_prompt_pos[0]) if variant == "release" else int(rows.subject_pos[0])
    edited, original, v = seen[0]
    assert v == variant
    torch.testing.assert_close(original[0], log_p[pos], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited[0], log_p[pos], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(original[0], log_p[other], atol=1e-3)


def test_loss_stop_rule_stops_once_the_total_loss_is_below_the_threshold(tiny_llama, char_tokenizer, tiny_requests):
    reqs = tiny_requests[:2]
    with torch.enable_grad():
        at_once = compute_targets(tiny_llama, char_tokenizer, reqs, 1, ["{}"], steps=5, stop_loss=1e6)
        never = compute_targets(tiny_llama, char_tokenizer, reqs, 1, ["{}"], steps=5, stop_loss=0.0)
    assert at_once.steps == [0, 0]  # every total loss is below 1e6 before the first update: z = h0
    h0 = layer_output_at_subject(tiny_llama, char_tokenizer, reqs, 1)
    torch.testing.assert_close(at_once.z, h0)
    assert never.steps == [5, 5]


# -- spread_residual ---------------------------------------------------------------------------------------------
def test_spread_residual_formula_and_telescoping():
    z, h = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    n = 4
    for i in range(n):
        torch.testing.assert_close(spread_residual(z, h, i, n), (z - h) / (n - i))
    # each layer writing its share exactly, with h recomputed after each layer: equal shares, ending at z
    cur = h.clone()
    for i in range(n):
        share = spread_residual(z, cur, i, n)
        torch.testing.assert_close(share, (z - h) / n)
        cur = cur + share
    torch.testing.assert_close(cur, z)


def _already_satisfied_request(model, tok) -> EditRequest:
    """A request whose target_new is already the model's greedy continuation at every target token (found by search:
    a two-letter subject after which the model predicts a space, then the character it predicts next)."""
    space = _ids(tok, " ")[0]
    letters = "abcdefghijklmnopqrstuvwxyz"
    subjects = [a + b for a in letters for b in letters]
    with torch.no_grad():
        nxt = model(input_ids=torch.tensor([_ids(tok, s) for s in subjects])).logits[:, -1].argmax(-1)
    for subject in (s for s, n in zip(subjects, nxt.tolist(), strict=True) if n == space):
        with torch.no_grad():
            second = int(model(input_ids=torch.tensor([_ids(tok, subject + " ")])).logits[0, -1].argmax())
        target = tok.decode([second])
        if target.strip() == target and target and target_token_ids(tok, target) == [space, second]:
            return EditRequest(case_id="done", prompt="{}", subject=subject, target_new=target)
    raise AssertionError("no already-satisfied request found for this tiny model")


def test_compute_targets_stops_satisfied_requests_and_keeps_requests_independent(tiny_llama, char_tokenizer):
    done = _already_satisfied_request(tiny_llama, char_tokenizer)
    hard = EditRequest(case_id="hard", prompt="The capital of {} is", subject="Spain", target_new="Rome")
    kwargs = dict(lr=0.5, steps=6, stop_rule="argmax", stop_prob=0.0)
    with torch.enable_grad():
        both = compute_targets(tiny_llama, char_tokenizer, [done, hard], 1, ["{}"], **kwargs)
        alone = compute_targets(tiny_llama, char_tokenizer, [hard], 1, ["{}"], **kwargs)
    h0 = layer_output_at_subject(tiny_llama, char_tokenizer, [done, hard], 1)
    # the satisfied request stops at step 0 with z = h0 exactly, and reports the probability of its target
    assert both.steps[0] == 0
    assert torch.equal(both.z[:, 0], h0[:, 0])
    expected_prob = torch.tensor(-_target_nll_with_shift(tiny_llama, char_tokenizer, done, 1, None)).exp()
    assert both.prob[0] == pytest.approx(float(expected_prob), rel=1e-4)
    # the other one keeps optimising, exactly as if it were alone in the batch
    assert both.steps[1] == 6
    assert not torch.allclose(both.z[:, 1], h0[:, 1])
    torch.testing.assert_close(both.z[:, 1], alone.z[:, 0], atol=1e-4, rtol=1e-4)


def test_compute_targets_requests_are_optimised_independently(tiny_gpt2, char_tokenizer, tiny_requests):
    """Each request's loss has its own shift: batching requests (rows of different lengths, several templates) must
    not change any request's target."""
    templates = ["{}", "Hi there. {}"]
    kwargs = dict(lr=0.5, steps=5, stop_rule="argmax", stop_prob=1.0)
    with torch.enable_grad():
        together = compute_targets(tiny_gpt2, char_tokenizer, tiny_requests, 1, templates, **kwargs)
        for j, r in enumerate(tiny_requests):
            alone = compute_targets(tiny_gpt2, char_tokenizer, [r], 1, templates, **kwargs)
            torch.testing.assert_close(together.z[:, j], alone.z[:, 0], atol=1e-4, rtol=1e-4)
            assert together.prob[j] == pytest.approx(alone.prob[0], rel=1e-3)


@pytest.mark.parametrize("layer", [0, 1])
def test_shifted_suffix_with_cached_prefix_equals_full_upper_run(tiny_model, char_tokenizer, layer):
    """Running only the positions from each row's shift on (prefix keys/values cached) must change nothing."""
    from editing.locate import _ShiftedSuffix

    prompts = ["Some context. The home of Ann is", "Ann is", "A much longer context line: Bob lives in"]
    rows = encode_rows(char_tokenizer, prompts, ["Ann", "Ann", "Bob"], ["Rome", None, "Lima"])
    block = _block(tiny_model, layer)
    hidden = capture(tiny_model, rows, {block: "output"})[block]
    shift = torch.randn(len(rows), tiny_model.config.hidden_size)
    shifted = hidden.clone()
    shifted[torch.arange(len(rows)), rows.subject_pos] += shift
    with torch.no_grad(), blocks_from(tiny_model, layer, shifted):
        full = tiny_model.base_model(input_ids=rows.input_ids, attention_mask=rows.attention_mask)[0]
    runner = _ShiftedSuffix(tiny_model, layer, hidden, rows)
    everyone = torch.arange(len(rows))
    for subset in (everyone, everyone, everyone[1:]):  # the prefix cache is reused across calls and row subsets
        for bucket in runner.buckets(subset):  # rows of one suffix length
            with torch.no_grad():
                out = runner(bucket, shift[bucket])
            for i, b in enumerate(bucket.tolist()):
                start, length = int(rows.subject_pos[b]), int(rows.attention_mask[b].sum())
                assert out.shape[1] == length - start
                torch.testing.assert_close(out[i], full[b, start:length], atol=1e-4, rtol=1e-4)


def test_layer_walk_gives_the_keys_and_residuals_of_a_full_rerun_after_each_update(
    tiny_llama, char_tokenizer, tiny_requests
):
    """The walk reuses the residual stream below the layer it is at; every value must equal a fresh forward pass."""
    reqs, templates, layers = tiny_requests[:3], ["{}", "Once. {}"], [0, 2]
    walk = LayerWalk(tiny_llama, char_tokenizer, reqs, templates)
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        weight = EditedWeight(tiny_llama, layer)
        expected_keys = compute_keys(tiny_llama, char_tokenizer, reqs, weight.name, templates)
        torch.testing.assert_close(walk.keys(layer, weight.name), expected_keys, atol=1e-5, rtol=1e-5)
        expected_h = layer_output_at_subject(tiny_llama, char_tokenizer, reqs, 3)
        torch.testing.assert_close(walk.output_at_subject(3), expected_h, atol=1e-5, rtol=1e-5)
        weight.add(0.5 * torch.randn(weight.get().shape, generator=generator))  # the update the next layer must see
