"""Tests for editing.stats: the preserved-knowledge second moment C0 and its on-disk cache."""

from __future__ import annotations

import pytest
import torch

from editing import stats
from editing.models import EditedWeight

TEXTS = [
    "The quick brown fox jumps over the lazy dog again.",  # 50 bytes: chunks of 16, 16, 16, 2 (the 2 is dropped)
    "short",  # < 8 tokens: dropped
    "Paris is the capital of France",  # 30 bytes: 16 + 14
]


def _expected_chunks(tok, texts, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Independent restatement of the chunking rule: per text, consecutive ``seq_len`` pieces, pieces shorter than 8
    dropped, the total cut at ``max_tokens``."""
    out, total = [], 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [ids[s : s + seq_len] for s in range(0, len(ids), seq_len)]
        for piece in pieces:
            if len(piece) >= 8 and total < max_tokens:
                piece = piece[: max_tokens - total]
                out.append(piece)
                total += len(piece)
    return out


def _explicit_c0(model, names: list[str], chunks: list[list[int]]) -> dict[str, torch.Tensor]:
    """``K^T K / n`` in float64 with K the hooked inputs of each module, one unpadded chunk at a time."""
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def make_hook(name):
        def hook(module, args, output) -> None:
            keys[name].append(args[0][0].double())

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]))
    finally:
        for h in handles:
            h.remove()
    result = {}
    for n in names:
        K = torch.cat(keys[n])
        assert K.shape[0] == sum(len(c) for c in chunks)
        result[n] = K.T @ K / K.shape[0]
    return result


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 noise of the forward pass (padded batches take other kernels than single rows)."""
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_chunking_rule_of_the_fixture_texts(char_tokenizer):
    assert [len(c) for c in _expected_chunks(char_tokenizer, TEXTS, 10_000, 16)] == [16, 16, 16, 16, 14]
    assert [len(c) for c in _expected_chunks(char_tokenizer, TEXTS, 40, 16)] == [16, 16, 8]


@pytest.mark.parametrize("max_tokens", [10_000, 40])
def test_collect_second_moments_equals_explicit_formula(tiny_model, char_tokenizer, max_tokens):
    names = [EditedWeight(tiny_model, layer).name for layer in (1, 2)]
    # batch_size 2 pads the 14-token chunk next to a 16-token one: padding must not enter the statistic
    got = stats.collect_second_moments(tiny_model, char_tokenizer, TEXTS, names, max_tokens, seq_len=16, batch_size=2)
    expected = _explicit_c0(tiny_model, names, _expected_chunks(char_tokenizer, TEXTS, max_tokens, 16))
    assert set(got) == set(names)
    for n in names:
        assert got[n].dtype == torch.float64
        assert got[n].shape == (expected[n].shape[0],) * 2
        _assert_close(got[n], expected[n])
    # the two layers see different inputs
    assert not torch.allclose(got[names[0]], got[names[1]])


def test_collect_second_moments_independent_of_batching(tiny_llama, char_tokenizer):
    name = EditedWeight(tiny_llama, 0).name
    a = stats.collect_second_moments(tiny_llama, char_tokenizer, TEXTS, [name], 1000, seq_len=16, batch_size=1)
    b = stats.collect_second_moments(tiny_llama, char_tokenizer, TEXTS, [name], 1000, seq_len=16, batch_size=8)
    _assert_close(a[name], b[name])


def test_collect_second_moments_empty_corpus(tiny_llama, char_tokenizer):
    name = EditedWeight(tiny_llama, 0).name
    with pytest.raises(ValueError, match="empty"):
        stats.collect_second_moments(tiny_llama, char_tokenizer, ["tiny"], [name], 100)


def test_cache_roundtrip_without_running_the_model(tiny_llama, char_tokenizer, tmp_path, monkeypatch):
    names = [EditedWeight(tiny_llama, layer).name for layer in (0, 2)]
    kwargs = dict(model_id="tiny", corpus_id=stats.corpus_fingerprint(TEXTS), max_tokens=60, cache_dir=tmp_path)
    first = stats.load_or_collect_second_moments(tiny_llama, char_tokenizer, TEXTS, names, seq_len=16, **kwargs)
    files = sorted((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 2
    assert not list((tmp_path / "stats").glob("*.tmp"))  # written atomically, no leftovers

    def boom(*args, **kw):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(stats, "collect_second_moments", boom)
    second = stats.load_or_collect_second_moments(tiny_llama, char_tokenizer, TEXTS, names, seq_len=16, **kwargs)
    assert list(second) == names
    for n in names:
        assert second[n].dtype == torch.float64
        assert torch.equal(first[n], second[n])
    expected = _explicit_c0(tiny_llama, names, _expected_chunks(char_tokenizer, TEXTS, 60, 16))
    for n in names:
        _assert_close(second[n], expected[n])

    # any change of the key (token count, corpus, model) is a cache miss
    for change in (dict(max_tokens=61), dict(corpus_id="other"), dict(model_id="other")):
        with pytest.raises(AssertionError, match="cache should have answered"):
            stats.load_or_collect_second_moments(
                tiny_llama, char_tokenizer, TEXTS, names, seq_len=16, **{**kwargs, **change}
            )


def test_cache_collects_only_missing_layers(tiny_llama, char_tokenizer, tmp_path, monkeypatch):
    names = [EditedWeight(tiny_llama, layer).name for layer in (0, 1, 3)]
    kwargs = dict(model_id="tiny", corpus_id="c", max_tokens=60, cache_dir=tmp_path, seq_len=16)
    stats.load_or_collect_second_moments(tiny_llama, char_tokenizer, TEXTS, names[1:2], **kwargs)
    asked = []
    real = stats.collect_second_moments

    def spy(model, tokenizer, texts, module_names, *args, **kw):
        asked.append(list(module_names))
        return real(model, tokenizer, texts, module_names, *args, **kw)

    monkeypatch.setattr(stats, "collect_second_moments", spy)
    out = stats.load_or_collect_second_moments(tiny_llama, char_tokenizer, TEXTS, names, **kwargs)
    assert asked == [[names[0], names[2]]]
    assert list(out) == names
    expected = _explicit_c0(tiny_llama, names, _expected_chunks(char_tokenizer, TEXTS, 60, 16))
    for n in names:
        _assert_close(out[n], expected[n])


def test_corpus_fingerprint_depends_on_text_boundaries():
    assert stats.corpus_fingerprint(["ab", "c"]) != stats.corpus_fingerprint(["a", "bc"])
    assert stats.corpus_fingerprint(["ab", "c"]) == stats.corpus_fingerprint(["ab", "c"])
