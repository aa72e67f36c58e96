"""Tests for editing.metrics: the HitRate metric and the teacher-forced scoring of edit requests."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from editing.metrics import (
    HitRate,
    average_per_case,
    locality_predictions,
    score_requests,
    score_targets,
    token_hits,
)
from editing.requests import EditRequest, LocalityProbe
from editing.rows import target_token_ids


# -- HitRate ---------------------------------------------------------------------------------------------------------
def test_hitrate_is_a_ratio_of_sums_not_a_mean_of_means():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, generator=gen) < 0.3 for n in (1, 7, 2, 13)]
    metric = HitRate()
    hits = total = 0
    for b in batches:
        metric.update(b)
        for x in b.tolist():  # plain Python accumulation
            hits += int(x)
            total += 1
    assert metric.compute().item() == pytest.approx(hits / total, rel=1e-6)
    assert hits / total != pytest.approx(sum(b.float().mean().item() for b in batches) / len(batches))
    metric.update(torch.tensor([1.0, 0.0]))  # float hits count the same
    assert metric.compute().item() == pytest.approx((hits + 1) / (total + 2), rel=1e-6)


def test_hitrate_nan_without_data_and_after_reset():
    metric = HitRate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(metric.compute().item())
        metric.update(torch.tensor([True]))
        assert metric.compute().item() == 1.0
        metric.reset()
        assert math.isnan(metric.compute().item())
        metric.update(torch.tensor([], dtype=torch.bool))
        assert math.isnan(metric.compute().item())


def test_hitrate_states_reduce_by_sum():
    a, b = HitRate(), HitRate()
    a.update(torch.tensor([True, True, False]))
    b.update(torch.tensor([False] * 5))
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(2 / 8)


# -- per-case averaging (the harnesses' mean over cases) ------------------------------------------------------------
def test_per_case_averaging_by_hand():
    # case 0: a right 1-token answer; case 1: a wrong 3-token answer (its tokens listed around case 0's on purpose)
    assert average_per_case(torch.tensor([False, True, False, False]), torch.tensor([1, 0, 1, 1])).tolist() == [1, 0]
    rows = [torch.tensor([True]), torch.tensor([False, False, False])]
    per_case, pooled = HitRate(), HitRate()
    per_case.update(token_hits(rows))
    pooled.update(token_hits(rows, "pooled"))
    assert per_case.compute().item() == 0.5
    assert pooled.compute().item() == 0.25


def test_per_case_averaging_weighs_every_case_once():
    rows = [torch.tensor([True, False]), torch.tensor([True, True, True, False]), torch.tensor([False])]
    assert token_hits(rows).tolist() == pytest.approx([1 / 2, 3 / 4, 0])
    assert token_hits(rows, "pooled").tolist() == [True, False, True, True, True, False, False]
    assert average_per_case(torch.tensor([2.0, 4.0, 9.0]), torch.tensor([0, 0, 1])).tolist() == [3.0, 9.0]
    with pytest.raises(ValueError, match="token_averaging"):
        token_hits(rows, "mean")


# -- score_targets: an independent one-row-at-a-time reference ------------------------------------------------------
def _reference_scores(model, tok, prompt: str, target: str):
    prompt_ids = tok(prompt)["input_ids"]
    tgt = target_token_ids(tok, target)
    ids = torch.tensor([prompt_ids + tgt])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    rows = logp[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tgt)]
    nll = -rows[torch.arange(len(tgt)), torch.tensor(tgt)].mean()
    return float(nll), rows.argmax(-1)


def test_score_targets_matches_unbatched_reference(tiny_model, char_tokenizer):
    prompts = ["The capital of Spain is", "Ed speaks", "A", "Bob Dylan plays the"]
    targets = ["Rome", "Dutch", "long answer here", "x"]
    scores = score_targets(tiny_model, char_tokenizer, prompts, targets, batch_size=3)  # two batches, padded
    assert scores.nll.shape == (4,)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        nll, top1 = _reference_scores(tiny_model, char_tokenizer, p, t)
        assert scores.nll[i].item() == pytest.approx(nll, rel=1e-4)
        assert scores.predictions[i].tolist() == top1.tolist()
        expected_correct = top1 == torch.tensor(target_token_ids(char_tokenizer, t))
        assert scores.correct[i].tolist() == expected_correct.tolist()


# -- score_requests ------------------------------------------------------------------------------------------------
def _n_tokens(tok, texts) -> int:
    return sum(len(target_token_ids(tok, t)) for t in texts)


def test_locality_reference_shape(tiny_model, char_tokenizer, tiny_requests):
    ref = locality_predictions(tiny_model, char_tokenizer, tiny_requests)
    assert list(ref) == [r.case_id for r in tiny_requests]
    for r in tiny_requests:
        assert len(ref[r.case_id]) == len(r.locality)
        for probe, pred in zip(r.locality, ref[r.case_id], strict=True):
            assert len(pred) == len(target_token_ids(char_tokenizer, probe.answer))
            assert pred == _reference_scores(tiny_model, char_tokenizer, probe.prompt, probe.answer)[1].tolist()


def test_score_requests_counterfact_family(tiny_model, char_tokenizer, tiny_requests):
    ref = locality_predictions(tiny_model, char_tokenizer, tiny_requests)
    hits = score_requests(tiny_model, char_tokenizer, tiny_requests, "counterfact", ref, averaging="pooled")
    assert set(hits) == {"efficacy", "generalization", "locality", "specificity"}
    # one comparison per request / per paraphrase
    assert hits["efficacy"].shape == (len(tiny_requests),)
    rephrases = [(p, r) for r in tiny_requests for p in r.rephrase_prompts]
    assert hits["generalization"].shape == (len(rephrases),)
    for r, hit in zip(tiny_requests, hits["efficacy"].tolist(), strict=True):
        new = _reference_scores(tiny_model, char_tokenizer, r.text, r.target_new)[0]
        true = _reference_scores(tiny_model, char_tokenizer, r.text, r.target_true)[0]
        assert hit == (new < true)
    for (p, r), hit in zip(rephrases, hits["generalization"].tolist(), strict=True):
        new = _reference_scores(tiny_model, char_tokenizer, p, r.target_new)[0]
        true = _reference_scores(tiny_model, char_tokenizer, p, r.target_true)[0]
        assert hit == (new < true)
    # locality: token agreement with the reference of the same (unedited) model
    probes = [p for r in tiny_requests for p in r.locality]
    assert hits["locality"].shape == (_n_tokens(char_tokenizer, [p.answer for p in probes]),)
    assert hits["locality"].all()
    # specificity: only the neighbourhood probe whose answer is the request's target_true ("Ghana is in" -> Madrid)
    assert hits["specificity"].shape == (1,)
    keep = _reference_scores(tiny_model, char_tokenizer, "Ghana is in", "Madrid")[0]
    flip = _reference_scores(tiny_model, char_tokenizer, "Ghana is in", "Rome")[0]
    assert hits["specificity"].item() == (keep < flip)


def test_score_requests_token_family(tiny_model, char_tokenizer, tiny_requests):
    ref = locality_predictions(tiny_model, char_tokenizer, tiny_requests)
    hits = score_requests(tiny_model, char_tokenizer, tiny_requests, "token", ref, averaging="pooled")
    assert set(hits) == {"efficacy", "generalization", "locality", "specificity"}
    # one hit per target token
    assert hits["efficacy"].shape == (_n_tokens(char_tokenizer, [r.target_new for r in tiny_requests]),)
    n_gen = sum(len(r.rephrase_prompts) * len(target_token_ids(char_tokenizer, r.target_new)) for r in tiny_requests)
    assert hits["generalization"].shape == (n_gen,)
    expected = torch.cat(
        [
            _reference_scores(tiny_model, char_tokenizer, r.text, r.target_new)[1]
            == torch.tensor(target_token_ids(char_tokenizer, r.target_new))
            for r in tiny_requests
        ]
    )
    assert hits["efficacy"].tolist() == expected.tolist()
    assert hits["locality"].all()


def test_locality_detects_a_changed_model(tiny_llama, char_tokenizer, tiny_requests):
    ref = locality_predictions(tiny_llama, char_tokenizer, tiny_requests)
    with torch.no_grad():
        tiny_llama.lm_head.weight.copy_(torch.randn_like(tiny_llama.lm_head.weight))
    hits = score_requests(tiny_llama, char_tokenizer, tiny_requests, "token", ref)
    assert not hits["locality"].all()


def test_score_requests_without_probes(tiny_llama, char_tokenizer, tiny_requests):
    bare = tiny_requests[2:]  # no paraphrases, no locality probes
    hits = score_requests(
        tiny_llama, char_tokenizer, bare, "counterfact", locality_predictions(tiny_llama, char_tokenizer, bare)
    )
    assert set(hits) == {"efficacy"}
    assert hits["efficacy"].dtype == torch.bool


def _accuracy(model, tok, prompt: str, answer: str) -> float:
    top1 = _reference_scores(model, tok, prompt, answer)[1]
    return (top1 == torch.tensor(target_token_ids(tok, answer))).double().mean().item()


def test_score_requests_token_family_per_case(tiny_model, char_tokenizer, tiny_requests):
    ref = locality_predictions(tiny_model, char_tokenizer, tiny_requests)
    hits = score_requests(tiny_model, char_tokenizer, tiny_requests, "token", ref)  # per case by default
    acc = lambda p, a: _accuracy(tiny_model, char_tokenizer, p, a)  # noqa: E731
    assert hits["efficacy"].tolist() == pytest.approx([acc(r.text, r.target_new) for r in tiny_requests])
    rephrases = [(p, r) for r in tiny_requests for p in r.rephrase_prompts]
    assert hits["generalization"].tolist() == pytest.approx([acc(p, r.target_new) for p, r in rephrases])
    probes = [p for r in tiny_requests for p in r.locality]
    assert hits["locality"].tolist() == [1.0] * len(probes)
    # no gold_prompt: the gold answer is scored on the probe's own prompt
    assert hits["specificity"].tolist() == pytest.approx([acc(p.prompt, p.answer) for p in probes])


def test_locality_per_case_differs_from_pooled(tiny_model, char_tokenizer, tiny_requests):
    ref = locality_predictions(tiny_model, char_tokenizer, tiny_requests)
    torch.manual_seed(1)
    head = tiny_model.get_output_embeddings().weight
    with torch.no_grad():
        head.add_(0.5 * head.std() * torch.randn_like(head))
    probes = [(p, ref[r.case_id][i]) for r in tiny_requests for i, p in enumerate(r.locality)]
    agree = [
        _reference_scores(tiny_model, char_tokenizer, p.prompt, p.answer)[1] == torch.tensor(expected)
        for p, expected in probes
    ]
    by_hand = [a.double().mean().item() for a in agree]
    pooled_by_hand = sum(a.sum().item() for a in agree) / sum(len(a) for a in agree)
    assert 0 < sum(by_hand) / len(by_hand) < 1 and sum(by_hand) / len(by_hand) != pytest.approx(pooled_by_hand)
    per_case, pooled = HitRate(), HitRate()
    per_case.update(score_requests(tiny_model, char_tokenizer, tiny_requests, "token", ref)["locality"])
    pooled.update(score_requests(tiny_model, char_tokenizer, tiny_requests, "token", ref, "pooled")["locality"])
    assert per_case.compute().item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
    assert pooled.compute().item() == pytest.approx(pooled_by_hand, rel=1e-6)


def test_token_specificity_scores_the_gold_answer_on_gold_prompt(tiny_llama, char_tokenizer):
    tok, plain, gold = char_tokenizer, "who wrote hamlet", "who wrote hamlet?"
    # Make the unedited model answer the gold prompt's first token (the space before the answer) and, by an orthogonal
    # head row, not the plain prompt's: the two prompts then score differently.
    with torch.no_grad():
        h_gold = tiny_llama.model(input_ids=torch.tensor([tok(gold)["input_ids"]]))[0][0, -1]
        h_plain = tiny_llama.model(input_ids=torch.tensor([tok(plain)["input_ids"]]))[0][0, -1]
        row = h_gold - (h_gold @ h_plain) / (h_plain @ h_plain) * h_plain
        tiny_llama.lm_head.weight[target_token_ids(tok, "z")[0]] = 100 * row / row.norm()
    on_gold, on_plain = _accuracy(tiny_llama, tok, gold, "z"), _accuracy(tiny_llama, tok, plain, "z")
    assert on_gold != on_plain  # the test can tell which prompt was scored
    other = LocalityProbe("Bob Dylan plays the", "guitar")  # no gold_prompt: its own prompt
    request = EditRequest(
        case_id="q",
        prompt="{} was written by",
        subject="Hamlet",
        target_new="Marlowe",
        locality=(LocalityProbe(plain, "z", gold_prompt=gold), other),
    )
    ref = locality_predictions(tiny_llama, tok, [request])
    hits = score_requests(tiny_llama, tok, [request], "token", ref)
    assert hits["specificity"].tolist() == pytest.approx([on_gold, _accuracy(tiny_llama, tok, other.prompt, "guitar")])
    assert hits["locality"].tolist() == [1.0, 1.0]  # WISE's locality stays on the plain prompt
    pooled = score_requests(tiny_llama, tok, [request], "token", ref, "pooled")["specificity"]
    assert pooled.shape == (_n_tokens(tok, ["z", "guitar"]),)
    # the CounterFact family keeps its own specificity (neighbourhood prompts answered by target_true): none here
    assert "specificity" not in score_requests(tiny_llama, tok, [request], "counterfact", ref)
