"""Tests for callbacks.perplexity: the value against a plain loop, the hooks, PRUNE's ordering, state and a CLI run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import inflate_rank_one, tiny_ft_args
from lightning.pytorch.trainer.states import TrainerFn

from callbacks import HeldOutPerplexity, PruneRestraint
from callbacks.perplexity import held_out_perplexity
from editing.methods import FineTune
from main import cli_main

LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "= A heading line that the reader skips =",
    "Paris is the capital of France.",
    "Music is an art form whose medium is sound and silence over time.",
    "Short.",  # 6 tokens: dropped, as for C0
]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


_TRAINER = SimpleNamespace(loggers=[], global_step=0)  # what on_fit_start reads of a Trainer


def _module(model, tokenizer, tmp_path, method=None):
    logged: dict[str, float] = {}
    return SimpleNamespace(
        model=model,
        tokenizer=tokenizer,
        method=method,
        cache_dir=tmp_path / "cache",
        edits_done=torch.tensor(0),
        log=lambda name, value, **_: logged.update({name: value}),
        logged=logged,
    )


def _loop_perplexity(model, tokenizer, texts: list[str], seq_len: int) -> float:
    """Every text cut into ``seq_len`` pieces (pieces under 8 tokens dropped), each scored alone, in float64."""
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) < 8:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([piece])).logits[0].double()
            for t in range(1, len(piece)):
                nll -= float(torch.log_softmax(logits[t - 1], dim=-1)[piece[t]])
                count += 1
    return math.exp(nll / count)


def test_perplexity_equals_a_plain_loop(tiny_llama, char_tokenizer, text_file, tmp_path):
    callback = HeldOutPerplexity(path=str(text_file), tokens=10_000, seq_len=24, batch_size=3)
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    callback.on_fit_start(_TRAINER, module)
    lengths = [len(c) for c in callback.chunks]
    assert len(set(lengths)) > 1 and min(lengths) >= 8  # padded batches are exercised
    kept = [line for line in LINES if not line.startswith("=")]
    expected = _loop_perplexity(tiny_llama, char_tokenizer, kept, seq_len=24)
    assert callback.compute(module) == pytest.approx(expected, rel=1e-5)
    one_by_one = held_out_perplexity(tiny_llama, callback.chunks, 0, batch_size=1)
    assert callback.compute(module) == pytest.approx(one_by_one, rel=1e-5)
    assert math.isfinite(expected) and expected > 1.0


def test_tokens_caps_the_evaluated_text(tiny_llama, char_tokenizer, text_file, tmp_path):
    callback = HeldOutPerplexity(path=str(text_file), tokens=50, seq_len=16)
    callback.on_fit_start(_TRAINER, _module(tiny_llama, char_tokenizer, tmp_path))
    assert sum(len(c) for c in callback.chunks) == 50


def test_editing_changes_it_and_history_is_kept(tiny_llama, char_tokenizer, text_file, tmp_path):
    callback = HeldOutPerplexity(path=str(text_file), tokens=200, seq_len=32)
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    trainer = SimpleNamespace(sanity_checking=True, loggers=[], global_step=0)
    callback.on_fit_start(trainer, module)  # the unedited baseline, straight to the (here: no) loggers
    chunks = callback.chunks
    assert [h["edits"] for h in callback.history] == [0]
    callback.on_validation_epoch_end(trainer, module)  # sanity check: skipped
    assert len(callback.history) == 1 and module.logged == {}

    trainer.sanity_checking = False
    callback.on_validation_epoch_end(trainer, module)
    before = module.logged["val/perplexity"]
    weight = tiny_llama.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        weight.add_(torch.randn_like(weight))
    module.edits_done += 3
    callback.on_validation_start(trainer, module)
    callback.on_validation_epoch_end(trainer, module)
    after = module.logged["val/perplexity"]
    assert callback.chunks is chunks  # the same chunks every time
    assert after != pytest.approx(before, rel=1e-3)
    baseline = callback.history[0]
    assert baseline["perplexity"] == pytest.approx(before)  # measured at fit start, on the same unedited weights
    assert callback.history == [baseline, {"edits": 0, "perplexity": before}, {"edits": 3, "perplexity": after}]


def test_model_sample_is_drawn_once_from_the_unedited_model(tiny_llama, char_tokenizer, tmp_path):
    callback = HeldOutPerplexity(tokens=64, seq_len=32)
    method = SimpleNamespace(stats_corpus="model", seed=0)
    module = _module(tiny_llama, char_tokenizer, tmp_path, method)
    callback.on_fit_start(_TRAINER, module)
    chunks = callback.chunks
    assert sum(len(c) for c in chunks) == 64
    assert list((tmp_path / "cache" / "corpus").glob("model-sample-*-64-1.json"))  # seed 1, not C0's 0
    module.edits_done += 1
    callback.on_validation_start(SimpleNamespace(), module)
    assert callback.chunks is chunks

    resumed = HeldOutPerplexity(tokens=64, seq_len=32)  # an edited model and no sample in the checkpoint
    with pytest.raises(ValueError, match="^path: the model already holds edits"):
        resumed.on_fit_start(_TRAINER, module)
    same_seed = HeldOutPerplexity(tokens=64, seq_len=32, seed=0)
    module.edits_done -= 1
    with pytest.warns(UserWarning, match="C0 corpus"):
        same_seed.on_fit_start(_TRAINER, module)


def test_measures_the_restrained_weights_before_or_after_prune_in_the_list(
    tiny_llama, char_tokenizer, text_file, tmp_path
):
    """PRUNE swaps the restrained weights in at ``on_validation_start`` and out at ``on_validation_end``, so a
    perplexity callback listed before or after it measures the restrained model."""
    method = FineTune(layer=1)
    method.setup(tiny_llama, char_tokenizer, "tiny", tmp_path)
    module = _module(tiny_llama, char_tokenizer, tmp_path, method)
    first, last = (HeldOutPerplexity(path=str(text_file), tokens=200, seq_len=32) for _ in range(2))
    prune = PruneRestraint()
    trainer = SimpleNamespace(
        sanity_checking=False,
        global_step=1,
        callbacks=[first, prune, last],
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        loggers=[],
    )
    for cb in trainer.callbacks:
        cb.on_fit_start(trainer, module)
    (weight,) = method.edited_weights().values()
    W = weight.parameter
    inflate_rank_one(W)
    module.edits_done += 1
    unrestrained = first.compute(module)

    for hook in ("on_validation_start", "on_validation_epoch_start"):
        for cb in trainer.callbacks:
            getattr(cb, hook)(trainer, module)
    restrained = first.compute(module)
    for hook in ("on_validation_epoch_end", "on_validation_end"):
        for cb in trainer.callbacks:
            getattr(cb, hook)(trainer, module)
    assert restrained != pytest.approx(unrestrained, rel=1e-3)
    assert first.history[-1]["perplexity"] == pytest.approx(restrained)
    assert last.history[-1]["perplexity"] == pytest.approx(restrained)  # PRUNE swaps back only at on_validation_end
    assert first.compute(module) == pytest.approx(unrestrained)


def test_checkpoint_round_trip(tiny_llama, char_tokenizer, text_file, tmp_path):
    callback = HeldOutPerplexity(path=str(text_file), tokens=100, seq_len=32)
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    callback.on_fit_start(_TRAINER, module)
    callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=False), module)
    torch.save({"callbacks": {callback.state_key: callback.state_dict()}}, tmp_path / "c.ckpt")

    entry = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"][callback.state_key]
    restored = HeldOutPerplexity(path=str(text_file), tokens=100, seq_len=32)
    restored.load_state_dict(entry)
    assert restored.history == callback.history and len(restored.history) == 2  # the baseline and one evaluation
    assert restored.chunks == callback.chunks
    restored.load_state_dict({})  # an older checkpoint without the entry
    assert restored.history == [] and restored.chunks == callback.chunks


def test_state_key(text_file):
    assert HeldOutPerplexity().state_key == (
        "HeldOutPerplexity{'path': None, 'tokens': 5000, 'seq_len': 256, 'seed': 1}"
    )
    assert HeldOutPerplexity(path=str(text_file), tokens=200).state_key == (
        f"HeldOutPerplexity{{'path': '{text_file}', 'tokens': 200, 'seq_len': 256, 'seed': 1}}"
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"path": "missing.txt"}, "path"),
        ({"path": "held_out.csv"}, "path"),
        ({"tokens": 1}, "tokens"),
        ({"seq_len": 4}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        HeldOutPerplexity(**kwargs)


def test_bad_jsonl_and_empty_text_name_the_path(tiny_llama, char_tokenizer, tmp_path):
    module = _module(tiny_llama, char_tokenizer, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of held-out text"}\n{"no_text": 1}\n')
    with pytest.raises(ValueError, match="^path: bad.jsonl: line 2"):
        HeldOutPerplexity(path=str(bad)).on_fit_start(_TRAINER, module)
    short = tmp_path / "short.txt"
    short.write_text("tiny\n= heading =\n")
    with pytest.raises(ValueError, match="^path: no held-out text"):
        HeldOutPerplexity(path=str(short)).on_fit_start(_TRAINER, module)


def test_cli_run_logs_perplexity_to_metrics_csv_and_summary(tiny_run, text_file):
    root = tiny_run["root"]
    cli_main(
        tiny_ft_args(
            tiny_run,
            root,
            "--trainer.callbacks+=callbacks.HeldOutPerplexity",
            f"--trainer.callbacks.path={text_file}",
            "--trainer.callbacks.tokens=200",
        )
    )
    rows = list(csv.DictReader(next(root.glob("csv/version_*/metrics.csv")).open()))
    values = [(float(r["edits/total"]), float(r["val/perplexity"])) for r in rows if r.get("val/perplexity")]
    assert [edits for edits, _ in values] == [0.0, 1.0, 2.0, 3.0]  # before the first edit, then every evaluation
    assert all(math.isfinite(p) and p > 1 for _, p in values)
    assert values[0][1] != pytest.approx(values[-1][1], rel=1e-4)  # the edits moved it
    summary = json.loads((root / "summary.json").read_text())
    assert [h["metrics"]["perplexity"] for h in summary["history"]] == pytest.approx([p for _, p in values[1:]])
    curve = summary["curves"]["HeldOutPerplexity"]  # with the unedited point, which the evaluations do not hold
    assert [h["edits"] for h in curve] == [0, 1, 2, 3]
    assert [h["perplexity"] for h in curve] == pytest.approx([p for _, p in values])
    assert summary["protocol"]["evaluation"] == "every 1 steps and at the end"  # val_check_interval 1 (an int)
