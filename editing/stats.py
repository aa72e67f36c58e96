"""Preserved-knowledge statistics ``C0 = E[k k^T]`` of edited projections, collected once and cached on disk.

One forward pass over the corpus fills every edited layer's statistic at once (hooks on all of them), accumulated in
float64. The cache is a safetensors file named by the SHA-256 of a JSON key (model, layer, corpus fingerprint, token
count, sequence length); it is written to a temporary file and renamed, so an interrupted run never leaves a partial
statistic behind.
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
    """``E[k k^T]`` (float64, ``(d_k, d_k)``) of the input of each named module over non-padding corpus tokens."""
    chunks = token_chunks(tokenizer, texts, max_tokens, seq_len)
    if not chunks:
        raise ValueError("stats corpus: no text to collect statistics from (the corpus is empty)")
    sums: dict[str, torch.Tensor] = {}
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            k = args[0][mask_holder["mask"]].double()  # (tokens, d_k)
            if name not in sums:
                sums[name] = torch.zeros(k.shape[1], k.shape[1], dtype=torch.float64, device=k.device)
            sums[name].addmm_(k.T, k)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in module_names]
    try:
        total = sum(len(c) for c in chunks)
        with tqdm(total=total, desc="C0 statistics", unit="tok") as bar:
            for start in range(0, len(chunks), batch_size):
                batch = chunks[start : start + batch_size]
                ids, mask = pad_right(batch, tokenizer.pad_token_id, model.device)
                mask_holder["mask"] = mask.bool()
                forward_until(model, module_names, input_ids=ids, attention_mask=mask)
                count += int(mask.sum())
                bar.update(int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
    return {name: s / count for name, s in sums.items()}


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
    if missing:
        log.info("Collecting C0 for %d layer(s) over %d corpus tokens (cached afterwards)", len(missing), max_tokens)
        fresh = collect_second_moments(model, tokenizer, texts, missing, max_tokens, seq_len)
        for name, c0 in fresh.items():
            with atomic_path(_cache_path(cache_dir, keys[name])) as tmp:
                save_file({"C0": c0.cpu().contiguous()}, tmp, metadata={"key": json.dumps(keys[name], sort_keys=True)})
        result.update(fresh)
    return {n: result[n].to(model.device) for n in module_names}
