"""Preserved-knowledge statistics ``C0 = E[k k^T]`` of edited projections, collected once and cached on disk.

One forward pass over the corpus fills every edited layer's statistic at once (hooks on all of them), accumulated in
float64; in a multi-process run each rank passes its share of the corpus and the sums and counts are all-reduced. The
cache is a safetensors file named by the SHA-256 of a JSON key (model, layer, corpus fingerprint, token count,
sequence length); the first process of each machine writes it to a temporary file and renames it, so an interrupted
run never leaves a partial statistic behind and processes sharing the directory never see one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.cache import atomic_path
from editing.distributed import any_across, is_local_zero, rank_and_world, share, sum_across
from editing.forward import forward_until
from editing.rows import pad_right

log = logging.getLogger(__name__)


def corpus_fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _cache_path(cache_dir: Path, key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / "stats" / f"{name}.safetensors"


def token_chunks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int, seq_len: int
) -> list[list[int]]:
    """Texts as ``seq_len``-token chunks (a text is cut, never joined with another), ``max_tokens`` in total."""
    chunks, total = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), seq_len):
            piece = ids[start : start + seq_len]
            if len(piece) < 8:
                continue
            piece = piece[: max_tokens - total]
            chunks.append(piece)
            total += len(piece)
            if total >= max_tokens:
                return chunks
    return chunks


@torch.no_grad()
def collect_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    module_names: Sequence[str],
    max_tokens: int,
    seq_len: int = 256,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``E[k k^T]`` (float64, ``(d_k, d_k)``) of the input of each named module over non-padding corpus tokens (each
    rank of a multi-process run passes its share of the chunks; collective)."""
    chunks = token_chunks(tokenizer, texts, max_tokens, seq_len)
    if not chunks:
        raise ValueError("stats corpus: no text to collect statistics from (the corpus is empty)")
    sums = {name: _zeros_gram(model.get_submodule(name), model.device) for name in module_names}
    count = torch.zeros((), dtype=torch.float64, device=model.device)
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            k = args[0][mask_holder["mask"]].double()  # (tokens, d_k)
            sums[name].addmm_(k.T, k)

        return hook

    mine = share(chunks)
    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in module_names]
    try:
        with tqdm(total=sum(len(c) for c in mine), desc="C0 statistics", unit="tok") as bar:
            for start in range(0, len(mine), batch_size):
                batch = mine[start : start + batch_size]
                ids, mask = pad_right(batch, tokenizer.pad_token_id, model.device)
                mask_holder["mask"] = mask.bool()
                forward_until(model, module_names, input_ids=ids, attention_mask=mask)
                count += mask.sum()
                bar.update(int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
    sum_across(count)
    return {name: sum_across(s) / count for name, s in sums.items()}


def _zeros_gram(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A float64 ``(d_k, d_k)`` zero matrix for the input of ``module`` (``nn.Linear`` or GPT-2's ``Conv1D``)."""
    d_k = getattr(module, "in_features", None) or module.weight.shape[0]  # Conv1D stores (d_in, d_out)
    return torch.zeros(d_k, d_k, dtype=torch.float64, device=device)


def load_or_collect_second_moments(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    module_names: Sequence[str],
    model_id: str,
    corpus_id: str,
    max_tokens: int,
    cache_dir: Path,
    seq_len: int = 256,
) -> dict[str, torch.Tensor]:
    """Cached :func:`collect_second_moments`: layers already on disk are read, the missing ones collected together."""
    keys = {
        name: {"model": model_id, "module": name, "corpus": corpus_id, "tokens": max_tokens, "seq_len": seq_len}
        for name in module_names
    }
    result: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        path = _cache_path(cache_dir, key)
        if path.exists():
            result[name] = load_file(path)["C0"]
    missing = [n for n in module_names if n not in result]
    if any_across(bool(missing)):  # the ranks collect together (all layers, when caches of machines differ)
        missing = missing if rank_and_world()[1] == 1 else list(module_names)
        log.info("Collecting C0 for %d layer(s) over %d corpus tokens (cached afterwards)", len(missing), max_tokens)
        fresh = collect_second_moments(model, tokenizer, texts, missing, max_tokens, seq_len)
        for name, c0 in fresh.items():
            if is_local_zero():
                with atomic_path(_cache_path(cache_dir, keys[name])) as tmp:
                    metadata = {"key": json.dumps(keys[name], sort_keys=True)}
                    save_file({"C0": c0.cpu().contiguous()}, tmp, metadata=metadata)
        result.update(fresh)
    return {n: result[n].to(model.device) for n in module_names}
