"""WISE's side memories (Wang et al., 2024, arXiv 2405.14768; DESIGN.md section 6): the memory bank, its knowledge
shards and their TIES merge.

A side memory is a copy ``W'`` of one FFN projection ``W`` of the frozen model. It is stored as its task vector
``tau = W' - W`` in the papers' ``(d_out, d_in)`` orientation, so the projection with the side memory is the
original output plus ``a tau^T`` for the projection's input activations ``a``. Edits train the working memory under
the random gradient mask of the current shard; saved shards are TIES-merged into WISE-Merge's merged memory or sealed
as one more WISE-Retrieve memory. Which memory answers an input is the router's decision (:mod:`editing.router`);
export and reload are in :mod:`editing.wise_export`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn


def ties_merge(
    task_vectors: Sequence[torch.Tensor], density: float = 0.53, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """TIES merging (Yadav et al., 2023) of task vectors of one matrix, weighted as WISE's release weighs it.

    1. Trim: keep the ``ceil(density * numel)`` largest magnitudes of each task vector, zero the rest.
    2. Elect: the sign of every entry is the sign of the weighted sum of the trimmed vectors; an exact tie (sum 0)
       elects ``+``, as the release does.
    3. Weighted disjoint mean: per entry, ``sum w_i tau_i / sum w_i`` over the trimmed values that are non-zero and
       agree with the elected sign (zeros and disagreeing values count in neither sum). With equal weights (the
       default ``1/k``) this is the plain mean of the agreeing values.
    """
    if not task_vectors:
        raise ValueError("ties_merge: no task vectors to merge")
    k = len(task_vectors)
    weights = [1.0 / k] * k if weights is None else list(weights)
    if len(weights) != k or any(w <= 0 for w in weights):
        raise ValueError(f"ties_merge: weights must be {k} positive numbers, got {weights}")
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
    weighted = w * stacked
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor > 0, divisor, torch.ones_like(divisor))


def shard_mask(shape: torch.Size | tuple[int, ...], density: float, seed: int, shard: int) -> torch.Tensor:
    """The random binary gradient mask of knowledge shard ``shard``: each entry is 1 with probability ``density``.

    Drawn on the CPU from ``(seed, shard)`` alone, so it is the same on every device and only two integers need to be
    stored to rebuild it.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.rand(shape, generator=generator) < density


MergeStyle = Literal["release", "continue"]
RELEASE_NEW_SHARDS_WEIGHT = 0.4  # WISE-Merge as released: the new shards of a merge share 0.4 (0.4 / k each) ...
RELEASE_MERGED_WEIGHT = 0.6  # ... and the previous merged memory weighs 0.6


class SideMemory(nn.Module):
    """The side memories of one projection, their thresholds and the shard state (the bank a router reads).

    - ``working``: the task vector being edited (float32). Its gradient is masked by the current shard's mask.
    - ``base``: WISE-Merge's merged memory, with ``base_texts``, the edits merged into it.
    - ``pending``: shards saved since the last merge (merged at ``merge_freq``). This project's extension: until the
      merge they answer, with the working memory, as their TIES merge (:meth:`current`), so every edit answers at
      every point of the stream, not only at merge points (the release answers from them only after the merge).
    - ``sealed``: WISE-Retrieve's merged memories of earlier blocks, each with its own threshold.

    ``merge_style`` says how WISE-Merge carries its merged memory over:

    - ``"release"`` (the authors' release; the paper does not say): every shard save and every merge resets the
      working memory to ``W`` (``tau = 0``); a merge TIES-merges the ``k`` new shards (weights ``0.4 / k`` each) with
      the previous merged memory (weight ``0.6``; the first merge: the shards alone, ``1 / k`` each); the merged
      memory answers next to the current one, each above its own threshold, the higher score winning (as retrieval
      over two memories).
    - ``"continue"`` (this project's variant): every new shard starts from the merged memory, a merge averages the
      ``k`` shards (``1 / k`` each) and its result is the working memory, so one memory answers (an entry of base 2
      plus 4 from one new shard and plus 0 from the other merges to (6 + 2) / 2 = 4; the release gives 2.5).

    Each memory keeps the ``(prompt, target)`` texts of its edits (thresholds are recomputed from them after a merge,
    and WISE-Retrieve replays them) and ``min_score``, the lowest routing score of its edits; its threshold is
    ``slack * min_score``, raised to ``floor(tau)`` when a floor rule is set (:attr:`floor`: WISE's
    ``threshold_quantile``, a quantile of the memory's scores on unrelated sentences, this project's extension). All
    of it but the floor rule is this module's extra state, so it travels in Lightning checkpoints; the rule is
    rebuilt by its owner and its values recomputed whenever the memories change.

    Args:
        shape: ``(d_out, d_in)`` of the projection.
        slack: threshold factor (WISE: 0.88; 0.5 for Llama-3-8B).
        mask_density, seed: density and seed of the shard masks.
        ties_density: fraction of each task vector's largest entries kept by TIES' trim step (0.53).
        merge_style: ``"release"`` or ``"continue"``, see above.
        module, score: the projection the memory belongs to and the routing score its thresholds were measured
            with; checkpointed, so a resume whose settings resolve to another block or score (for example a
            changed model preset) is refused instead of loading the memory into the wrong place.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        slack: float,
        mask_density: float,
        seed: int,
        ties_density: float = 0.53,
        merge_style: MergeStyle = "release",
        module: str = "",
        score: str = "paper",
    ) -> None:
        super().__init__()
        if merge_style not in ("release", "continue"):
            raise ValueError(f"merge_style: expected 'release' or 'continue', got {merge_style!r}")
        self.shape = tuple(shape)
        self.ties_density = ties_density
        self.merge_style = merge_style
        self.module, self.score = module, score
        self.slack = slack
        self.mask_density = mask_density
        self.seed = seed
        self.register_buffer("working", torch.zeros(self.shape), persistent=False)
        self.working_texts: list[tuple[str, str]] = []  # edits since the last merge (pending shards + working)
        self.working_min = math.inf
        self.base: torch.Tensor | None = None
        self.base_texts: list[tuple[str, str]] = []
        self.base_min = math.inf
        self.pending: list[torch.Tensor] = []
        self.pending_min: list[float] = []
        self.sealed: list[torch.Tensor] = []
        self.sealed_texts: list[list[tuple[str, str]]] = []
        self.sealed_min: list[float] = []
        self.shard = 0
        self.shard_edits = 0  # edits of the working memory since the last shard save
        self._version = 0  # bumped by every change of the memories: keys the cached preview merge
        self._preview: tuple[int, torch.Tensor] | None = None
        self.floor: Callable[[torch.Tensor], float] | None = None  # lowest threshold of a memory, from its task vector
        self._floors: tuple[int, list[float]] | None = None  # the floors of the answering memories, per version

    # -- memories and thresholds ---------------------------------------------------------------------------------
    def current(self) -> tuple[torch.Tensor, float]:
        """The memory being edited as it answers now, and its lowest edit score: the working memory, or, while shards
        saved since the last merge wait for it, the TIES merge of those shards and the working memory (cached until the
        memories change)."""
        if not self.pending:
            return self.working, self.working_min
        if self._preview is None or self._preview[0] != self._version:
            self._preview = (self._version, ties_merge([*self.pending, self.working], self.ties_density))
        return self._preview[1], self.current_min()

    def current_min(self) -> float:
        """The lowest edit score of the current memory (its threshold basis), without building its preview."""
        return min([*self.pending_min, self.working_min])

    def memory_count(self) -> int:
        """How many memories answer queries (without building the current memory's preview)."""
        return len(self._slots())

    def current_texts(self) -> list[tuple[str, str]]:
        """The edits the current memory answers for (``"continue"``: the merged memory's too, it started from it)."""
        return self.base_texts + self.working_texts if self.merge_style == "continue" else self.working_texts

    def trained_texts(self) -> list[tuple[str, str]]:
        """The edits the working task vector itself holds: those since the last shard save, plus the merged memory's
        when it started from it (``"continue"``). A saved shard's edits are not among them: they answer through the
        merge, and a fresh shard under another mask would have to learn them anew."""
        since_save = self.working_texts[len(self.working_texts) - self.shard_edits :]
        return (self.base_texts if self.merge_style == "continue" else []) + since_save  # no merge yet: base_texts []

    def _slots(self) -> list[tuple[str, int]]:
        """Which memory answers at each position of :meth:`answering`: sealed ones, the merged one, the current one."""
        slots = [("sealed", i) for i in range(len(self.sealed))]
        if self.merge_style == "release" and self.base is not None:
            slots.append(("base", 0))
        if self.current_texts():
            slots.append(("current", 0))
        return slots

    def answering(self) -> list[tuple[torch.Tensor, float]]:
        """``(tau, threshold)`` of every memory that answers queries: the sealed ones, WISE-Merge's merged memory
        (``"release"``), then the current one when it holds edits."""
        memories = []
        for kind, i in self._slots():
            if kind == "sealed":
                memories.append((self.sealed[i], self.slack * self.sealed_min[i]))
            elif kind == "base":
                memories.append((self.base, self.slack * self.base_min))
            else:
                tau, min_score = self.current()
                memories.append((tau, self.slack * min_score))
        if self.floor is None:
            return memories
        if self._floors is None or self._floors[0] != self._version:
            self._floors = (self._version, [self.floor(tau) for tau, _ in memories])
        return [(tau, max(t, f)) for (tau, t), f in zip(memories, self._floors[1], strict=True)]

    def memory_texts(self) -> list[list[tuple[str, str]]]:
        """The edit texts of every answering memory, in :meth:`answering` order."""
        texts = []
        for kind, i in self._slots():
            if kind == "sealed":
                texts.append(self.sealed_texts[i])
            else:
                texts.append(self.base_texts if kind == "base" else self.current_texts())
        return texts

    def set_min_score(self, index: int, value: float) -> None:
        """Set the threshold basis of memory ``index`` (as in :meth:`answering`; -1 = the last one)."""
        kind, i = self._slots()[index]
        if kind == "sealed":
            self.sealed_min[i] = value
        elif kind == "base":
            self.base_min = value
        else:
            self.pending_min = [value] * len(self.pending)
            if self.merge_style == "continue" and self.base is not None and torch.equal(self.base, self.working):
                self.base_min = value
            self.working_min = value

    def current_mask(self) -> torch.Tensor:
        """The gradient mask of the current shard, on the working memory's device."""
        return shard_mask(self.shape, self.mask_density, self.seed, self.shard).to(self.working.device)

    def record_edits(self, texts: Sequence[tuple[str, str]], scores: torch.Tensor) -> None:
        """Add edits to the working memory with their routing scores (the running minimum is the threshold basis)."""
        self.working_texts.extend(texts)
        self.shard_edits += len(texts)
        if scores.numel():
            self.working_min = min(self.working_min, float(scores.min()))
        self._version += 1

    def save_shard(self) -> None:
        """End the current shard: keep its task vector for the next merge and restart under the next shard's mask,
        from ``W`` (``"release"``, or before the first merge) or from the merged memory (``"continue"``)."""
        self.pending.append(self.working.clone())
        self.pending_min.append(self.working_min)
        if self.merge_style == "continue" and self.base is not None:
            self.working, self.working_min = self.base.clone(), self.base_min
        else:
            self.working, self.working_min = torch.zeros_like(self.working), math.inf
        self.shard += 1
        self.shard_edits = 0
        self._version += 1

    def merge(self, retrieve: bool) -> None:
        """TIES-merge the saved shards (edits not saved yet are saved first, so none is lost).

        WISE-Merge: the result is the merged memory (see ``merge_style`` for its weights and what restarts).
        WISE-Retrieve: the result is sealed as one more memory and a fresh working memory starts from zeros. The
        thresholds are right at once: each merged memory's basis is the lowest score its edits had before the
        merge; the merge changes those scores, so :meth:`set_min_score` refines them from the edits' texts.
        """
        if self.shard_edits:
            self.save_shard()
        if not self.pending:
            return
        k = len(self.pending)
        lowest = self.current_min()  # the lowest score of the edits being merged
        fresh = torch.zeros_like(self.working)
        if retrieve:
            self.sealed.append(ties_merge(self.pending, self.ties_density))
            self.sealed_texts.append(self.working_texts)
            self.sealed_min.append(lowest)
            self.working, self.working_texts, self.working_min = fresh, [], math.inf
        elif self.merge_style == "release":
            if self.base is None:
                merged = ties_merge(self.pending, self.ties_density)
            else:
                weights = [RELEASE_NEW_SHARDS_WEIGHT / k] * k + [RELEASE_MERGED_WEIGHT]
                merged = ties_merge([*self.pending, self.base], self.ties_density, weights)
            self.base, self.base_min = merged, min(self.base_min, lowest)
            self.base_texts = self.base_texts + self.working_texts
            self.working, self.working_texts, self.working_min = fresh, [], math.inf
        else:
            merged = ties_merge(self.pending, self.ties_density)  # each shard already holds the merged memory
            self.base, self.base_min = merged.clone(), lowest
            self.base_texts = self.base_texts + self.working_texts
            self.working, self.working_texts, self.working_min = merged, [], lowest
        self.pending, self.pending_min = [], []
        self._version += 1

    def edit_count(self) -> int:
        """Edits this side memory has received."""
        return len(self.base_texts) + len(self.working_texts) + sum(len(texts) for texts in self.sealed_texts)

    # -- state ---------------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "working": self.working.cpu(),
            "working_texts": [list(t) for t in self.working_texts],
            "working_min": self.working_min,
            "base": None if self.base is None else self.base.cpu(),
            "base_texts": [list(t) for t in self.base_texts],
            "base_min": self.base_min,
            "pending": [t.cpu() for t in self.pending],
            "pending_min": list(self.pending_min),
            "sealed": [t.cpu() for t in self.sealed],
            "sealed_texts": [[list(t) for t in texts] for texts in self.sealed_texts],
            "sealed_min": list(self.sealed_min),
            "shard": self.shard,
            "shard_edits": self.shard_edits,
            "seed": self.seed,
            "mask_density": self.mask_density,
            "merge_style": self.merge_style,
            "module": self.module,
            "score": self.score,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if tuple(state["working"].shape) != self.shape:
            raise ValueError(
                f"side memory: the checkpoint's memory is {tuple(state['working'].shape)}, the projection is "
                f"{self.shape}; resume with the same model and side-memory module"
            )
        # Checkpoints older than merge_style kept every edit in the working memory: the "continue" layout.
        style = state.get("merge_style", "continue" if state["base"] is not None else self.merge_style)
        if style != self.merge_style:
            raise ValueError(
                f"merge_style: the checkpoint's memories were built with {style!r}, this run uses "
                f"{self.merge_style!r}; resume with the same merge_style"
            )
        for key in ("module", "score"):  # checkpoints before session 7 do not say
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"{key}: the checkpoint's side memory was built with {state[key]!r}, this run's settings give "
                    f"{getattr(self, key)!r}; resume with --model.method.init_args.{key} {state[key]}"
                )
        dev = self.working.device

        def texts(items: list) -> list[tuple[str, str]]:
            return [tuple(t) for t in items]

        self.working = state["working"].to(dev)
        self.working_texts, self.working_min = texts(state["working_texts"]), state["working_min"]
        self.base = None if state["base"] is None else state["base"].to(dev)
        self.base_texts, self.base_min = texts(state.get("base_texts", [])), state["base_min"]
        self.pending = [t.to(dev) for t in state["pending"]]
        self.pending_min = list(state["pending_min"])
        self.sealed = [t.to(dev) for t in state["sealed"]]
        self.sealed_texts = [texts(items) for items in state["sealed_texts"]]
        self.sealed_min = list(state["sealed_min"])
        self.shard, self.shard_edits = state["shard"], state.get("shard_edits", 0)
        self.seed, self.mask_density = state["seed"], state["mask_density"]
        self._version += 1

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        """Move the memories that are not buffers (their number varies) with the module."""
        super()._apply(fn, recurse)
        self.base = None if self.base is None else fn(self.base)
        self.pending = [fn(t) for t in self.pending]
        self.sealed = [fn(t) for t in self.sealed]
        return self
