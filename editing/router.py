"""WISE's activation router (Wang et al., 2024, arXiv 2405.14768; DESIGN.md section 6).

A side memory's routing score of a sequence is ``|| a tau^T ||_2`` averaged over its real tokens (the maximum for
inputs longer than ``long_input_max`` tokens, as in the release), ``a`` being the input of the projection and
``tau = W' - W`` the memory's task vector. A memory answers a sequence iff its score exceeds the memory's threshold,
one decision per sequence; with several memories (WISE-Retrieve, or WISE-Merge's merged and working memories) the
one with the highest score among those above their own threshold answers (or, as a switch, the highest score relative
to its threshold).

The router is a forward hook on the projection, so the model keeps its structure (``save_pretrained`` writes the
unedited weights) and every ordinary use routes: batched forward passes route each sequence separately (padding is
excluded through the attention mask, read by a pre-hook on the decoder), and ``generate()`` routes once on the prompt
and keeps that route for the generated tokens (a forward pass that continues a KV cache reuses the last decision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel


def routing_scores(
    a: torch.Tensor,
    tau: torch.Tensor,
    mask: torch.Tensor,
    long_input_max: int | None,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B,)`` activation scores ``|| a tau^T ||_2`` aggregated over each row's real tokens (``mask``: ``(B, T)``).

    The mean over tokens; the maximum for rows with more than ``long_input_max`` real tokens (0: every row). With
    ``centre`` (``(d_in,)``), the score of ``a - centre`` (this project's extension: the inputs' common component,
    shared by every sentence, no longer counts towards routing).
    """
    a = a.float() if centre is None else a.float() - centre.float()
    norms = F.linear(a, tau.float()).norm(dim=-1)  # (B, T)
    m = mask.to(norms.dtype)
    lengths = m.sum(1)
    mean = (norms * m).sum(1) / lengths.clamp(min=1)
    if long_input_max is None:
        return mean
    peak = norms.masked_fill(m == 0, float("-inf")).amax(1)
    return torch.where(lengths > long_input_max, peak, mean)


RetrievalRule = Literal["score", "ratio"]


def choose_memory(scores: torch.Tensor, thresholds: torch.Tensor, rule: RetrievalRule = "score") -> torch.Tensor:
    """``(B,)`` index of the memory that answers each row (-1: the main weights) from scores ``(M, B)`` and
    thresholds ``(M,)``: among the memories whose own threshold the row's score exceeds, the one with the highest
    score (``score``, the paper's WISE-Retrieve) or the highest score relative to its threshold (``ratio``, this
    project's extension: memories whose scores run on different scales compete on equal terms)."""
    thresholds = thresholds.to(scores.device)[:, None]
    above = scores > thresholds
    key = scores if rule == "score" else scores / thresholds
    best = key.masked_fill(~above, float("-inf")).argmax(0)
    return torch.where(above.any(0), best, torch.full_like(best, -1))


class MemoryBank(Protocol):
    """What the router reads: the memories that answer queries, as ``(tau, threshold)`` pairs."""

    def answering(self) -> Sequence[tuple[torch.Tensor, float]]: ...


class Router:
    """Routes every sequence of a forward pass to one memory of ``bank`` or to the main weights.

    Args:
        bank: the memories (:class:`~editing.side_memory.SideMemory` while editing, the exported ones after).
        long_input_max: rows longer than this many real tokens are scored by their maximum token score.
        centre: the projection inputs' mean that scores subtract (``None``: the paper's score).
        retrieval: which memory answers when several are above their thresholds (:func:`choose_memory`).
    """

    def __init__(
        self,
        bank: MemoryBank,
        long_input_max: int | None,
        centre: torch.Tensor | None = None,
        retrieval: RetrievalRule = "score",
    ) -> None:
        self.bank = bank
        self.long_input_max = long_input_max
        self.centre = centre
        self.retrieval = retrieval
        # Not checkpointed: the attention mask of the current forward pass, and the route of the last prefill (reused
        # by passes that continue a KV cache).
        self.enabled = True
        self._mask: torch.Tensor | None = None
        self._continuation = False
        self._route: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None  # (M, B) scores of the last routed forward pass
        self.last_route: torch.Tensor | None = None  # (B,) memory index per row, -1 = main weights

    def scores(self, a: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:func:`routing_scores` with this router's rule (long inputs, centre)."""
        return routing_scores(a, tau, mask, self.long_input_max, self.centre)

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
        memories = self.bank.answering()
        if not memories:
            return None
        b = a.shape[0]
        if self._continuation and self._route is not None and self._route.shape[0] == b:
            route = self._route
        else:
            mask = self._mask if self._mask is not None and self._mask.shape == a.shape[:2] else None
            mask = mask if mask is not None else torch.ones(a.shape[:2], device=a.device)
            scores = torch.stack([self.scores(a, tau, mask) for tau, _ in memories])  # (M, B)
            route = choose_memory(scores, torch.tensor([t for _, t in memories]), self.retrieval)
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
