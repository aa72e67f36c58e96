"""Tests for ROME's fluency (generation entropy) in editing.metrics and its ``val/fluency`` log in EditingModule."""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from types import SimpleNamespace

import pytest
import torch

from editing.data import EditStream
from editing.metrics import (
    fluency_scores,
    generate_texts,
    locality_predictions,
    ngram_entropy,
    weighted_ngram_entropy,
    word_tokens,
)
from editing.module import EditingModule


# -- n-gram entropy ----------------------------------------------------------------------------------------------------
def test_weighted_ngram_entropy_by_hand():
    text = "to be or not to be."
    assert word_tokens(text) == ["to", "be", "or", "not", "to", "be", "."]  # punctuation is its own token
    # bigrams: (to, be) twice, (be, or), (or, not), (not, to), (be, .) once each: 6 in all
    h2 = 2 / 6 * math.log2(6 / 2) + 4 * (1 / 6 * math.log2(6))
    # trigrams: 5, all distinct
    h3 = math.log2(5)
    assert ngram_entropy(word_tokens(text), 2) == pytest.approx(h2, rel=1e-12)
    assert ngram_entropy(word_tokens(text), 3) == pytest.approx(h3, rel=1e-12)
    assert weighted_ngram_entropy(text) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2, rel=1e-12)


def test_repetition_lowers_the_score():
    assert weighted_ngram_entropy("the the the the the the") == 0.0
    assert weighted_ngram_entropy("") == 0.0
    varied = "Paris is the capital of France, and its largest city by far."
    assert weighted_ngram_entropy(varied) > weighted_ngram_entropy("Paris is Paris is Paris is Paris is Paris is")


# -- generation --------------------------------------------------------------------------------------------------------
PROMPTS = ["The capital of Spain is", "Ed", "Bob Dylan plays the guitar and he sings"]


def test_generate_texts_continue_each_prompt_to_max_length(tiny_llama, char_tokenizer, monkeypatch):
    max_length = 45
    one_by_one = [generate_texts(tiny_llama, char_tokenizer, [p], max_length, "greedy")[0] for p in PROMPTS]
    runs = []
    generate = tiny_llama.generate

    def spy(**kwargs):
        runs.append((kwargs, out := generate(**kwargs)))
        return out

    monkeypatch.setattr(tiny_llama, "generate", spy)
    texts = generate_texts(tiny_llama, char_tokenizer, PROMPTS, max_length, "greedy", batch_size=3)
    assert texts == one_by_one  # left padding: every row continues its own text
    (kwargs, out), lengths = runs[0], [len(p) for p in PROMPTS]  # one token per character
    assert kwargs["max_new_tokens"] == max_length - min(lengths) and kwargs["eos_token_id"] is None
    width = max(lengths)
    for prompt, text, row, n in zip(PROMPTS, texts, out.tolist(), lengths, strict=True):
        # prompt and continuation count together (ROME's max_out_len): each row keeps max_length - n new tokens
        continuation = char_tokenizer.decode(row[width : width + max_length - n], skip_special_tokens=True)
        assert text == unicodedata.normalize("NFKD", prompt + continuation)
        assert text != prompt
    long = "x" * (max_length + 5)
    assert generate_texts(tiny_llama, char_tokenizer, [long], max_length, "top5") == [long]


def test_generate_texts_top5_is_seeded_and_leaves_the_global_rng(tiny_llama, char_tokenizer):
    state = torch.get_rng_state()
    first = generate_texts(tiny_llama, char_tokenizer, PROMPTS, 40, "top5", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_texts(tiny_llama, char_tokenizer, PROMPTS, 40, "top5", seed=3) == first
    assert generate_texts(tiny_llama, char_tokenizer, PROMPTS, 40, "top5", seed=4) != first
    with pytest.raises(ValueError, match="fluency_sampling"):
        generate_texts(tiny_llama, char_tokenizer, PROMPTS, 40, "beam")


def test_fluency_scores_mean_per_record(tiny_llama, char_tokenizer, tiny_requests):
    requests = [
        dataclasses.replace(tiny_requests[0], generation_prompts=("Spain is", "In Spain people")),
        tiny_requests[1],  # no generation prompts: no score
        dataclasses.replace(tiny_requests[2], generation_prompts=("Ed says",)),
    ]
    scores = fluency_scores(tiny_llama, char_tokenizer, requests, 30, "greedy")
    texts = generate_texts(tiny_llama, char_tokenizer, ["Spain is", "In Spain people", "Ed says"], 30, "greedy")
    entropies = [weighted_ngram_entropy(t) for t in texts]
    assert scores.tolist() == pytest.approx([(entropies[0] + entropies[1]) / 2, entropies[2]], rel=1e-6)
    assert fluency_scores(tiny_llama, char_tokenizer, tiny_requests, 30).numel() == 0


# -- val/fluency in the module -----------------------------------------------------------------------------------------
def _validate(model, tokenizer, requests, **kwargs) -> dict[str, object]:
    """One evaluation (a ``validation_step`` and the epoch's end) of an unedited ``EditingModule`` on ``requests``;
    the logged values by name."""
    stream = EditStream(tuple(requests), "counterfact", "test", "test", 1)
    module = EditingModule(method=SimpleNamespace(), stream=stream, **kwargs)
    module.model, module.tokenizer = model, tokenizer
    module.locality_reference = locality_predictions(model, tokenizer, requests)
    logged: dict[str, object] = {}
    module.log = lambda name, value, **_: logged.update({name: value})
    module.validation_step(list(enumerate(requests)), 0)
    module.on_validation_epoch_end()
    return logged


def test_fluency_is_logged_when_requests_have_generation_prompts(tiny_llama, char_tokenizer, tiny_requests):
    requests = [dataclasses.replace(tiny_requests[0], generation_prompts=("Spain is", "Madrid")), *tiny_requests[1:]]
    logged = _validate(tiny_llama, char_tokenizer, requests, fluency_max_length=30)
    assert {"val/efficacy", "val/generalization", "val/locality", "val/fluency"} <= set(logged)
    expected = fluency_scores(tiny_llama, char_tokenizer, requests, 30, "top5", seed=0)
    assert expected.numel() == 1  # one record has generation prompts
    assert float(logged["val/fluency"]) == pytest.approx(expected.item(), rel=1e-6)
    assert float(logged["val/fluency"]) > 0
    assert "val/fluency" not in _validate(tiny_llama, char_tokenizer, requests, fluency=False)
    assert "val/fluency" not in _validate(tiny_llama, char_tokenizer, tiny_requests)


def test_module_rejects_unknown_averaging():
    with pytest.raises(ValueError, match="token_averaging"):
        EditingModule(method=SimpleNamespace(), token_averaging="mean")
