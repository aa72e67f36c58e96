"""WISE's side memories and their router (Wang et al., 2024, arXiv 2405.14768; DESIGN.md section 6).

A side memory is a copy ``W'`` of one FFN projection ``W`` of the frozen model. It is stored as its task vector
``tau = W' - W`` in the papers' ``(d_out, d_in)`` orientation, so the projection with the side memory is the
original output plus ``a tau^T`` for the projection's input activations ``a``. The routing score of a sequence is
``|| a tau^T ||_2`` averaged over its real tokens (the maximum for inputs longer than ``long_input_max`` tokens, as in
the release); the side memory answers a sequence iff its score exceeds the memory's threshold, one decision per
sequence. With several memories (WISE-Retrieve) the one with the highest score among those above their own threshold
answers.

The router is a forward hook on the projection, so the model keeps its structure (``save_pretrained`` writes the
unedited weights) and every ordinary use routes: batched forward passes route each sequence separately (padding is
excluded through the attention mask, read by a pre-hook on the decoder), and ``generate()`` routes once on the prompt
and keeps that route for the generated tokens (a forward pass that continues a KV cache reuses the last decision).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EXPORT_TENSORS = "side_memory.safetensors"
EXPORT_CONFIG = "side_memory.json"


def ties_merge(
    task_vectors: Sequence[torch.Tensor], density: float = 0.53, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023) of task vectors of one matrix.

    1. Trim: keep the ``ceil(density * numel)`` largest magnitudes of each task vector, zero the rest.
    2. Elect: the sign of every entry is the sign of the weighted sum of the trimmed vectors (weights ``1/k``).
    3. Disjoint mean: average, per entry, the trimmed values whose sign agrees with the elected one (zeros and
       disagreeing values do not count).
    """
    if not task_vectors:
        raise ValueError("ties_merge: no task vectors to merge")
    k = len(task_vectors)
    weights = [1.0 / k] * k if weights is None else list(weights)
    trimmed = []
    for tau in task_vectors:
        keep = math.ceil(density * tau.numel())
        flat = tau.flatten()
        kept = torch.zeros_like(flat)
        if keep:
            idx = flat.abs().topk(keep).indices
            kept[idx] = flat[idx]
        trimmed.append(kept.view_as(tau))
    stacked = torch.stack(trimmed)  # (k, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * tau.dim())
    elected = torch.sign((w * stacked).sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def shard_mask(shape: torch.Size | tuple[int, ...], density: float, seed: int, shard: int) -> torch.Tensor:
    """The random binary gradient mask of knowledge shard ``shard``: each entry is 1 with probability ``density``.

    Drawn on the CPU from ``(seed, shard)`` alone, so it is the same on every device and only two integers need to be
    stored to rebuild it.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.rand(shape, generator=generator) < density


def routing_scores(a: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor, long_input_max: int | None) -> torch.Tensor:
    """``(B,)`` activation scores ``|| a tau^T ||_2`` aggregated over each row's real tokens (``mask``: ``(B, T)``).

    The mean over tokens; the maximum for rows with more than ``long_input_max`` real tokens.
    """
    norms = F.linear(a.float(), tau.float()).norm(dim=-1)  # (B, T)
    m = mask.to(norms.dtype)
    lengths = m.sum(1)
    mean = (norms * m).sum(1) / lengths.clamp(min=1)
    if long_input_max is None:
        return mean
    peak = norms.masked_fill(m == 0, float("-inf")).amax(1)
    return torch.where(lengths > long_input_max, peak, mean)


class SideMemory(nn.Module):
    """The side memories of one projection, their thresholds, the shard state and the router.

    - ``working``: the task vector being edited (float32). Its gradient is masked by the current shard's mask.
    - ``base``: WISE-Merge's last merged memory; a new shard of the working memory starts from it.
    - ``pending``: shards saved since the last merge (merged at ``merge_freq``; until then the current memory answers
      as their TIES merge with the working memory, see :meth:`current`).
    - ``sealed``: WISE-Retrieve's merged memories of earlier blocks, each with its own threshold.

    Each memory keeps the ``(prompt, target)`` texts of its edits (thresholds are recomputed from them after a merge,
    and WISE-Retrieve replays them) and ``min_score``, the lowest routing score of its edits; its threshold is
    ``slack * min_score``. All of it is this module's extra state, so it travels in Lightning checkpoints.

    Args:
        shape: ``(d_out, d_in)`` of the projection.
        slack: threshold factor (WISE: 0.88; 0.5 for Llama-3-8B).
        long_input_max: rows longer than this are scored by their maximum token score.
        mask_density, seed: density and seed of the shard masks.
        ties_density: fraction of each task vector's largest entries kept by TIES' trim step (0.53).
    """

    def __init__(
        self,
        shape: tuple[int, int],
        slack: float,
        long_input_max: int | None,
        mask_density: float,
        seed: int,
        ties_density: float = 0.53,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.ties_density = ties_density
        self.slack = slack
        self.long_input_max = long_input_max
        self.mask_density = mask_density
        self.seed = seed
        self.register_buffer("working", torch.zeros(self.shape), persistent=False)
        self.working_texts: list[tuple[str, str]] = []
        self.working_min = math.inf
        self.base: torch.Tensor | None = None
        self.base_min = math.inf
        self.pending: list[torch.Tensor] = []
        self.pending_min: list[float] = []
        self.sealed: list[torch.Tensor] = []
        self.sealed_texts: list[list[tuple[str, str]]] = []
        self.sealed_min: list[float] = []
        self.shard = 0
        # Routing state (not checkpointed): the differentiable task vector while editing, the attention mask of the
        # current forward pass, and the route of the last prefill (reused by forward passes that continue a KV cache).
        self.editing_tau: torch.Tensor | None = None
        self.enabled = True
        self._mask: torch.Tensor | None = None
        self._continuation = False
        self._route: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None  # (M, B) scores of the last routed forward pass
        self.last_route: torch.Tensor | None = None  # (B,) memory index per row, -1 = main weights
        self._version = 0  # bumped by every change of the memories: keys the cached preview merge
        self._preview: tuple[int, torch.Tensor] | None = None

    # -- memories and thresholds ---------------------------------------------------------------------------------
    def current(self) -> tuple[torch.Tensor, float]:
        """The memory being edited as it answers now, and its lowest edit score: the working memory, or, while shards
        saved since the last merge wait for it, the TIES merge of those shards and the working memory (cached until the
        memories change), so every edit answers at every point of the stream, not only at merge points."""
        if not self.pending:
            return self.working, self.working_min
        if self._preview is None or self._preview[0] != self._version:
            self._preview = (self._version, ties_merge([*self.pending, self.working], self.ties_density))
        return self._preview[1], min([*self.pending_min, self.working_min])

    def answering(self) -> list[tuple[torch.Tensor, float]]:
        """``(tau, threshold)`` of every memory that answers queries: the sealed ones, then the current one when it
        holds edits."""
        memories = [(tau, self.slack * m) for tau, m in zip(self.sealed, self.sealed_min, strict=True)]
        if self.working_texts:
            tau, min_score = self.current()
            memories.append((tau, self.slack * min_score))
        return memories

    def current_mask(self) -> torch.Tensor:
        """The gradient mask of the current shard, on the working memory's device."""
        return shard_mask(self.shape, self.mask_density, self.seed, self.shard).to(self.working.device)

    def record_edits(self, texts: Sequence[tuple[str, str]], scores: torch.Tensor) -> None:
        """Add edits to the working memory with their routing scores (the running minimum is the threshold basis)."""
        self.working_texts.extend(texts)
        if scores.numel():
            self.working_min = min(self.working_min, float(scores.min()))
        self._version += 1

    def save_shard(self) -> None:
        """End the current shard: keep its task vector for the next merge and restart from the last merged memory
        (zeros before the first merge) with the next shard's mask."""
        self.pending.append(self.working.clone())
        self.pending_min.append(self.working_min)
        self.working = self.base.clone() if self.base is not None else torch.zeros_like(self.working)
        self.working_min = self.base_min
        self.shard += 1
        self._version += 1

    def merge(self, retrieve: bool) -> None:
        """TIES-merge the saved shards. WISE-Merge: the result becomes the working memory and the base of the next
        shards. WISE-Retrieve: the result is sealed as one more memory and a fresh working memory starts from zeros.
        Thresholds of the merged memory are set by :meth:`set_min_score` (its edits' scores change in a merge)."""
        if not self.pending:
            return
        merged = ties_merge(self.pending, self.ties_density)
        self.pending, self.pending_min = [], []
        self._version += 1
        if retrieve:
            self.sealed.append(merged)
            self.sealed_texts.append(self.working_texts)
            self.sealed_min.append(self.working_min)
            self.working = torch.zeros_like(merged)
            self.working_texts, self.working_min = [], math.inf
            self.base, self.base_min = None, math.inf
        else:
            self.base = merged.clone()
            self.working = merged

    def set_min_score(self, index: int, value: float) -> None:
        """Set the threshold basis of memory ``index`` (as in :meth:`answering`; -1 = the current memory)."""
        if index == -1 or index == len(self.sealed):
            self.pending_min = [value] * len(self.pending)
            self.working_min = value
            if self.base is not None and torch.equal(self.base, self.working):
                self.base_min = value
        else:
            self.sealed_min[index] = value

    def edit_count(self) -> int:
        """Edits this side memory has received (the working memory's texts include every shard since the last seal)."""
        return len(self.working_texts) + sum(len(texts) for texts in self.sealed_texts)

    def memory_texts(self) -> list[list[tuple[str, str]]]:
        """The edit texts of every answering memory, in :meth:`answering` order."""
        texts = list(self.sealed_texts)
        if self.working_texts:
            texts.append(self.working_texts)
        return texts

    # -- routing -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the model as if it had no side memory (e.g. to capture the unedited activations)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def record_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the decoder: the attention mask of the tokens this pass computes, and whether it continues a
        KV cache (a generation step)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = ids if ids is not None else kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers >= 5.2x names it ``cache``
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        width = tokens.shape[1] if tokens is not None else None
        self._mask = mask[:, -width:] if isinstance(mask, torch.Tensor) and mask.dim() == 2 and width else None
        self._continuation = past > 0

    def route(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the projection: add the answering memory's ``a tau^T`` to the rows routed to it."""
        if not self.enabled:
            return None
        a = args[0]
        if self.editing_tau is not None:
            return output + F.linear(a, self.editing_tau.to(a.dtype))
        memories = self.answering()
        if not memories:
            return None
        b = a.shape[0]
        if self._continuation and self._route is not None and self._route.shape[0] == b:
            route = self._route
        else:
            mask = self._mask if self._mask is not None and self._mask.shape == a.shape[:2] else None
            mask = mask if mask is not None else torch.ones(a.shape[:2], device=a.device)
            scores = torch.stack([routing_scores(a, tau, mask, self.long_input_max) for tau, _ in memories])  # (M, B)
            thresholds = torch.tensor([t for _, t in memories], device=a.device)[:, None]
            above = scores > thresholds
            best = scores.masked_fill(~above, float("-inf")).argmax(0)
            route = torch.where(above.any(0), best, torch.full_like(best, -1))
            self._route, self.last_scores, self.last_route = route, scores.detach(), route
        out = output
        for j in route.unique().tolist():
            if j < 0:
                continue
            rows = route == j
            out = out.clone() if out is output else out
            out[rows] = output[rows] + F.linear(a[rows], memories[j][0].to(a.dtype))
        return out

    def attach(self, model: PreTrainedModel, module_name: str) -> list[torch.utils.hooks.RemovableHandle]:
        """Install the router on ``module_name`` of ``model``; returns the hook handles."""
        return [
            model.base_model.register_forward_pre_hook(self.record_inputs, with_kwargs=True),
            model.get_submodule(module_name).register_forward_hook(self.route),
        ]

    # -- state ---------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "working": self.working.cpu(),
            "working_texts": [list(t) for t in self.working_texts],
            "working_min": self.working_min,
            "base": None if self.base is None else self.base.cpu(),
            "base_min": self.base_min,
            "pending": [t.cpu() for t in self.pending],
            "pending_min": list(self.pending_min),
            "sealed": [t.cpu() for t in self.sealed],
            "sealed_texts": [[list(t) for t in texts] for texts in self.sealed_texts],
            "sealed_min": list(self.sealed_min),
            "shard": self.shard,
            "seed": self.seed,
            "mask_density": self.mask_density,
            "ties_density": self.ties_density,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["working"].shape) != self.shape:
            raise ValueError(
                f"side memory: the checkpoint's memory is {tuple(state['working'].shape)}, the projection is "
                f"{self.shape}; resume with the same model and side-memory module"
            )
        dev = self.working.device

        def texts(items: list) -> list[tuple[str, str]]:
            return [tuple(t) for t in items]

        self.working = state["working"].to(dev)
        self.working_texts, self.working_min = texts(state["working_texts"]), state["working_min"]
        self.base = None if state["base"] is None else state["base"].to(dev)
        self.base_min = state["base_min"]
        self.pending = [t.to(dev) for t in state["pending"]]
        self.pending_min = list(state["pending_min"])
        self.sealed = [t.to(dev) for t in state["sealed"]]
        self.sealed_texts = [texts(items) for items in state["sealed_texts"]]
        self.sealed_min = list(state["sealed_min"])
        self.shard, self.seed, self.mask_density = state["shard"], state["seed"], state["mask_density"]
        self.ties_density = state["ties_density"]
        self._version += 1

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """Move the memories that are not buffers (their number varies) with the module."""
        super()._apply(fn, recurse)
        self.base = None if self.base is None else fn(self.base)
        self.pending = [fn(t) for t in self.pending]
        self.sealed = [fn(t) for t in self.sealed]
        return self


def export_edited(
    path: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    memory: SideMemory,
    module_name: str,
) -> None:
    """Save the unedited model (``save_pretrained``), its tokenizer and the answering side memories with their
    thresholds, so :func:`load_edited` rebuilds a model that routes identically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with memory.disabled():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    memories = memory.answering()
    save_file({f"memory_{i}": tau.detach().float().cpu().contiguous() for i, (tau, _) in enumerate(memories)},
              str(path / EXPORT_TENSORS))  # fmt: skip
    config = {
        "module": module_name,
        "thresholds": [t for _, t in memories],
        "long_input_max": memory.long_input_max,
        "shape": list(memory.shape),
    }
    (path / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def load_edited(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, SideMemory]:
    """Load a model written by :func:`export_edited` with its router installed (frozen: for inference)."""
    path = Path(path)
    config = json.loads((path / EXPORT_CONFIG).read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tensors = load_file(str(path / EXPORT_TENSORS), device=str(device))
    taus = [tensors[f"memory_{i}"] for i in range(len(config["thresholds"]))]
    shape = tuple(config["shape"])
    memory = SideMemory(shape, slack=1.0, long_input_max=config["long_input_max"], mask_density=0.0, seed=0).to(device)
    memory.sealed = taus
    memory.sealed_min = list(config["thresholds"])  # slack 1: the stored thresholds are used as they are
    memory.sealed_texts = [[] for _ in taus]
    memory.attach(model, config["module"])
    return model, tokenizer, memory
