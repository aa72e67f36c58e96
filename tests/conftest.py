"""Shared fixtures: an in-memory byte-level tokenizer, tiny random Llama / GPT-2 models and a few edit requests.

Nothing here touches the network or the real 135M model; every model is built from a config in milliseconds.
"""

from __future__ import annotations

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
