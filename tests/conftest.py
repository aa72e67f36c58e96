"""Shared fixtures: an in-memory byte-level tokenizer, tiny random Llama / GPT-2 models and a few edit requests.

Nothing here touches the network or the real 135M model; every model is built from a config in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from editing.requests import EditRequest, LocalityProbe

# The default initialisation (std 0.02) gives a near-uniform next-token distribution whose predictions no shift of one
# residual vector can move; a wider one makes edits measurable on these 32-wide models.
INIT = 0.3


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_defaults():
    """Every test starts from the same seed and leaves the default dtype as it found it."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


def _char_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<pad>")
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, no BOS, pad = eos = ``<pad>`` (id 0), right padding."""
    tok = _char_tokenizer()
    assert len(tok("ab")["input_ids"]) == 2
    assert len(tok(" x", add_special_tokens=False)["input_ids"]) == 2
    assert tok.pad_token_id == tok.eos_token_id == 0
    return tok


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().eval().requires_grad_(False)


@pytest.fixture
def tiny_llama(char_tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(char_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=0,
        initializer_range=INIT,
    )
    return _finish(LlamaForCausalLM(config))


@pytest.fixture
def tiny_gpt2(char_tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(char_tokenizer),
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=256,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=INIT,
    )
    return _finish(GPT2LMHeadModel(config))


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    """Each tiny model family in turn (Llama: ``nn.Linear`` down_proj; GPT-2: transposed ``Conv1D`` c_proj)."""
    return tiny_llama if request.param == "llama" else tiny_gpt2


@pytest.fixture
def tiny_requests() -> list[EditRequest]:
    return [
        EditRequest(
            case_id="0",
            prompt="The capital of {} is",
            subject="Spain",
            target_new="Rome",
            target_true="Madrid",
            rephrase_prompts=("Spain has its capital in", "The seat of government of Spain is"),
            locality=(LocalityProbe("The capital of France is", "Paris"), LocalityProbe("Ghana is in", "Madrid")),
        ),
        EditRequest(
            case_id="1",
            prompt="{} plays the",
            subject="Miles Davis",
            target_new="piano",
            target_true="trumpet",
            rephrase_prompts=("The instrument of Miles Davis is the",),
            locality=(LocalityProbe("Bob Dylan plays the", "guitar"),),
        ),
        EditRequest(
            case_id="2",
            prompt="{} speaks",
            subject="Ed",
            target_new="Dutch",
            target_true="English",
        ),
    ]


CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital and most populous city of France.",
    "= A heading line that the corpus reader skips =",
    "Music is an art form whose medium is sound and silence over time.",
]


@pytest.fixture
def stats_corpus(tmp_path) -> str:
    """A small ``.txt`` corpus (one text per line) for the C0 statistic."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS_LINES * 3) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def method_kwargs(stats_corpus) -> dict:
    """LocateThenEdit arguments that bind fast to the tiny models: edited blocks 0-1, a 200-token corpus, one
    3-token context template."""
    return dict(layers=[0, 1], stats_corpus=stats_corpus, stats_tokens=200, context_seeds=["The"], context_length=3)


@pytest.fixture
def bind(char_tokenizer, tmp_path):
    """``bind(method, model)``: ``method.setup`` on a tiny model with every cache under ``tmp_path``."""

    def _bind(method, model):
        method.setup(model, char_tokenizer, "tiny", tmp_path / "cache")
        return method

    return _bind


@pytest.fixture
def edit_and_check(char_tokenizer):
    """``edit_and_check(method, model, requests)``: one full step (``prepare`` + ``apply``) on a bound method.

    Asserts that exactly the edited projections changed (every one of them) and nothing else in the model; returns the
    per-request target_new NLL on the edited prompts before/after, the residual after the last edited layer at the
    subject before/after, the targets ``z`` and the weight change of every edited layer (``(d_out, d_in)``, float64).
    """
    from editing.locate import layer_output_at_subject
    from editing.metrics import score_targets

    def nll(model, requests):
        return score_targets(model, char_tokenizer, [r.text for r in requests], [r.target_new for r in requests]).nll

    def _edit(method, model, requests) -> dict:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        weights = method.edited_weights()
        w_before = {name: w.get().double().clone() for name, w in weights.items()}
        nll_before = nll(model, requests)
        plan = method.prepare(requests)
        h_before = layer_output_at_subject(model, char_tokenizer, requests, method.layers[-1]).double()
        method.apply(requests, plan)
        h_after = layer_output_at_subject(model, char_tokenizer, requests, method.layers[-1]).double()

        edited = {f"{name}.weight" for name in weights}
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == edited, f"changed {sorted(changed)}, edited {sorted(edited)}"
        assert not any(p.requires_grad for p in model.parameters())
        assert not model.training
        return dict(
            nll_before=nll_before,
            nll_after=nll(model, requests),
            h_before=h_before,
            h_after=h_after,
            z=plan.z.double(),
            deltas={name: w.get().double() - w_before[name] for name, w in weights.items()},
        )

    return _edit


_TINY_RUN_REQUESTS = [
    {
        "case_id": f"t{i}",
        "prompt": "The home of {} is",
        "subject": subject,
        "target_new": new,
        "target_true": true,
        "rephrase_prompts": [f"{subject} lives in"],
        "locality": [{"prompt": "The sky is", "answer": "blue"}],
    }
    for i, (subject, new, true) in enumerate([("Ann", "Rome", "Oslo"), ("Bob", "Lima", "Kyiv"), ("Cy", "Baku", "Riga")])
]


@pytest.fixture
def tiny_run(tmp_path: Path, tiny_llama, char_tokenizer) -> dict[str, Path]:
    """A saved tiny model, a request file and a corpus: everything a CLI run needs, offline."""
    model_dir = tmp_path / "tiny-model"
    tiny_llama.save_pretrained(model_dir)
    char_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "edits.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _TINY_RUN_REQUESTS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} talks about the weather and cities." for i in range(40)))
    return {"model": model_dir, "data": data, "corpus": corpus, "root": tmp_path / "run", "cache": tmp_path / "cache"}


@pytest.fixture
def tiny_run_requests() -> list[dict]:
    """The canonical records that ``tiny_run`` writes to its request file."""
    return [dict(r) for r in _TINY_RUN_REQUESTS]
