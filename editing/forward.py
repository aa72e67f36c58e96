"""Partial forward passes: capture named modules' inputs or outputs and stop once they have run, run only the blocks
above a layer, and apply the LM head only where log-probabilities are needed.

Used by the locate-then-edit toolkit, the statistics, the metrics and WISE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from editing.models import architecture_of
from editing.rows import EncodedRows


class _StopForward(Exception):
    """Raised by a hook once every module of interest has run: the rest of the network need not run."""


def forward_until(
    model: PreTrainedModel,
    module_names: Sequence[str],
    context: contextlib.AbstractContextManager | None = None,
    **inputs: torch.Tensor,
) -> None:
    """Run ``model(**inputs)`` only until every named module has produced its output (hooks do the recording).

    ``context`` is entered after the hooks are attached (names are resolved first: :func:`blocks_from` renumbers
    the blocks)."""
    pending = set(module_names)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            pending.discard(name)
            if not pending:
                raise _StopForward

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in module_names]
    try:
        with context or contextlib.nullcontext():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def _first_tensor(x: torch.Tensor | tuple) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else x[0]


@torch.no_grad()
def capture(
    model: PreTrainedModel,
    rows: EncodedRows,
    modules: dict[str, str],
    positions: torch.Tensor | None = None,
    length_buckets: int = 1,
    above: tuple[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Inputs or outputs of modules, at one position per row (or every position when ``positions`` is None).

    Args:
        modules: module path -> ``"input"`` or ``"output"``.
        positions: ``(B,)`` token index per row.
        length_buckets: run the rows sorted by length in this many groups, each padded only to its own longest row
            (rows of a step differ by 2x in length: one padded batch ran ~1.6x the real tokens). Without
            ``positions``, positions past a row's end hold its group's padding states or zeros: mask them.
        above: ``(layer, hidden)``: run only the blocks above ``layer``, fed the residual stream ``hidden``
            ``(B, T, d)`` after it (:func:`blocks_from`); module names keep the model's own numbering.

    Returns:
        module path -> ``(B, d)`` (or ``(B, T, d)`` without positions). The forward pass stops after the last module.
    """
    if length_buckets > 1 and len(rows) > length_buckets:
        order = rows.attention_mask.sum(1).argsort()
        parts = []
        for g in order.tensor_split(length_buckets):
            part = rows.select(g)
            part_above = None if above is None else (above[0], above[1][g, : part.input_ids.shape[1]])
            parts.append((g, capture(model, part, modules, None if positions is None else positions[g], 1, part_above)))
        found = {}
        for name in modules:
            shape = (len(rows), *parts[-1][1][name].shape[1:])  # the last group holds the longest rows
            found[name] = parts[0][1][name].new_zeros(shape)
            for g, part in parts:
                found[name][(g, *map(slice, part[name].shape[1:]))] = part[name]
        return found
    found: dict[str, torch.Tensor] = {}
    batch_index = torch.arange(len(rows), device=rows.input_ids.device)

    def make_hook(name: str, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            x = _first_tensor(args if kind == "input" else output)
            found[name] = (x if positions is None else x[batch_index, positions]).detach()

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n, kind)) for n, kind in modules.items()]
    try:
        context = None if above is None else blocks_from(model, *above)
        forward_until(model, list(modules), context, input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return found


@contextlib.contextmanager
def blocks_from(model: PreTrainedModel, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run only the blocks above ``layer``, feeding ``hidden`` (``(B, T, d)``) to the first of them.

    The block list is swapped for its upper slice and a pre-hook replaces the first upper block's input; embeddings
    still run (cheap) so masks and positions are built as usual.
    """
    arch = architecture_of(model)
    parent_name, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_name)
    blocks: nn.ModuleList = getattr(parent, attr)
    if layer + 1 >= len(blocks):
        raise ValueError(f"layers: the last edited layer ({layer}) must be below the top block ({len(blocks) - 1})")

    def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = blocks[layer + 1].register_forward_pre_hook(feed, with_kwargs=True)
    setattr(parent, attr, nn.ModuleList(list(blocks)[layer + 1 :]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        handle.remove()


def log_softmax_at(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) from final hidden states ``(N, d)``; the LM head runs on these only."""
    return model.get_output_embeddings()(hidden).float().log_softmax(-1)


LSE_CHUNK_ROWS = 32  # rows of 49k-word vocabularies per float32 chunk: a few MB, cache-sized


class _TokenLogProb(torch.autograd.Function):
    """``log p(id) = logit_id - logsumexp(logits)`` per row, reduced in float32 a few rows at a time.

    What ``logits.float().log_softmax(-1).gather(...)`` computes, without its full-vocabulary float32 tensors (the
    cast, the log-softmax, the gather's zero-filled gradient and the casts back); the gradient ``g (onehot - softmax)``
    is written once, in the logits' dtype. Measured with the LM head at the target optimisation's shape on a CPU:
    1.20x in bfloat16, 1.01x in float32 (benchmarks/token_log_probs.py, docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd's signature
        lse = torch.cat([chunk.float().logsumexp(-1) for chunk in logits.split(LSE_CHUNK_ROWS)])
        ctx.save_for_backward(logits, ids, lse)
        return logits.gather(1, ids[:, None])[:, 0].float() - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001 - autograd's signature
        logits, ids, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, len(logits), LSE_CHUNK_ROWS):
            rows = slice(start, start + LSE_CHUNK_ROWS)
            g = grad[rows, None].float()
            chunk = (logits[rows].float() - lse[rows, None]).exp_().mul_(-g)
            out[rows] = chunk.scatter_add_(1, ids[rows, None], g)
        return out, None


def token_log_probs(
    model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(ids) (N,) float32, argmax == ids (N,))`` from final hidden states ``(N, d)``: the LM head runs on these
    only, and no full-vocabulary log-softmax is materialised (:class:`_TokenLogProb`); gradients flow when enabled."""
    logits = model.get_output_embeddings()(hidden)
    return _TokenLogProb.apply(logits, ids), logits.argmax(-1) == ids


def target_log_probs(model: PreTrainedModel, rows: EncodedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced ``(log_p (N_tokens, V), row (N_tokens,), id (N_tokens,))`` at every real target token of
    ``rows``; gradients flow when enabled."""
    hidden = model.base_model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)[0]
    r, p, ids = rows.target_positions()
    return log_softmax_at(model, hidden[r, p]), r, ids


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str | None) -> Iterator[None]:
    """Run ``model`` with another attention implementation (``None``: leave it), restoring its own afterwards.

    The target optimisation attends over a few dozen positions; on CPU, PyTorch's fused (flash) attention backward is
    several times slower there than plain matmul attention, in bfloat16 most of all."""
    own = model.config._attn_implementation
    if name is None or name == own:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(own)
