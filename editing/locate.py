"""The locate-then-edit toolkit shared by MEMIT, AlphaEdit and LyapLock (DESIGN.md section 4).

- :func:`generate_context_templates`: short model-written prefixes, so targets and keys do not depend on one phrasing.
- :func:`compute_keys`: MLP keys ``k`` (input of the edited projection at the last subject token, template-averaged).
- :func:`compute_targets`: the MEMIT target ``z = h0 + delta`` for every request of a step, optimised together.
- :func:`spread_residual`: the share of ``z - h`` that layer ``i`` of ``n`` must write.

Rows come from :mod:`editing.rows` and partial forward passes from :mod:`editing.forward`.

Speed (DESIGN.md section 9): the target optimisation runs the blocks below the shift point once without gradient, then
only the blocks above it, and applies the LM head at target positions only; finished requests leave the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from editing.forward import blocks_from, capture, log_softmax_at
from editing.models import architecture_of, sample_text
from editing.requests import EditRequest
from editing.rows import EncodedRows, encode_rows, mean_per_row


def generate_context_templates(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seeds: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    length: int = 10,
    seed: int = 0,
) -> list[str]:
    """``["{}"]`` plus one sampled prefix of ``length`` tokens per seed word (top-5 sampling), each followed by
    ``". {}"`` (MEMIT's context templates)."""
    if not seeds:
        return ["{}"]
    texts = sample_text(model, tokenizer, list(seeds), length, seed, top_k=5)
    return ["{}"] + [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]


KeyAveraging = Literal["release", "flat"]


def average_template_keys(k: torch.Tensor, averaging: KeyAveraging = "release") -> torch.Tensor:
    """Average keys ``k: (n, n_templates, d_k)`` over the templates, the bare prompt ``"{}"`` first; ``(n, d_k)``.

    ``release``: the MEMIT/AlphaEdit/LyapLock releases' ``compute_ks`` averages each context type (the bare prompt;
    the generated prefixes) and then the types, so the bare prompt weighs 1/2 and the prefixes share the other 1/2.
    ``flat``: one mean over every template (this project's earlier variant).
    """
    if averaging == "flat" or k.shape[1] == 1:
        return k.mean(1)
    return (k[:, 0] + k[:, 1:].mean(1)) / 2


def compute_keys(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    module_name: str,
    templates: Sequence[str],
    averaging: KeyAveraging = "release",
) -> torch.Tensor:
    """Keys ``K: (d_k, n)``: input of the edited projection at the last subject token, averaged over the templates
    (:func:`average_template_keys`)."""
    prompts = [t.replace("{}", r.prompt).replace("{}", r.subject, 1) for r in requests for t in templates]
    subjects = [r.subject for r in requests for _ in templates]
    rows = encode_rows(tokenizer, prompts, subjects, device=model.device)
    k = capture(model, rows, {module_name: "input"}, rows.subject_pos)[module_name]  # (n * n_templates, d_k)
    return average_template_keys(k.view(len(requests), len(templates), -1), averaging).T


def layer_output_at_subject(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], layer: int
) -> torch.Tensor:
    """``h: (d, n)``, the residual stream after block ``layer`` at the last subject token of each bare prompt."""
    block = f"{architecture_of(model).blocks}.{layer}"
    rows = encode_rows(tokenizer, [r.text for r in requests], [r.subject for r in requests], device=model.device)
    return capture(model, rows, {block: "output"}, rows.subject_pos)[block].T


def spread_residual(z: torch.Tensor, h: torch.Tensor, i: int, n_layers: int) -> torch.Tensor:
    """MEMIT's residual spreading: edited layer ``i`` (0-based, in order) of ``n_layers`` writes ``(z - h)/(n - i)``."""
    return (z - h) / (n_layers - i)


class _ShiftedSuffix:
    """The blocks above ``layer`` for rows whose residual stream is shifted at one position each.

    Positions before a row's shift position do not depend on the shift, so their keys and values in the upper blocks
    are computed once (no gradient) and cached; every optimisation iteration then runs only the positions from the
    shift on. Prefixes are left-padded and suffixes right-padded, with explicit position ids, so one batched call
    serves rows of any length.
    """

    def __init__(self, model: PreTrainedModel, layer: int, hidden: torch.Tensor, rows: EncodedRows) -> None:
        self.model, self.layer, dev = model, layer, hidden.device
        b = torch.arange(len(rows), device=dev)[:, None]
        start, lengths = rows.subject_pos, rows.attention_mask.sum(1)
        self.prefix_len = int(start.max())
        width = int((lengths - start).max())
        src = torch.arange(self.prefix_len, device=dev)[None] - (self.prefix_len - start[:, None])  # (B, P)
        prefix_valid = src >= 0
        idx = start[:, None] + torch.arange(width, device=dev)[None]  # (B, S)
        suffix_valid = idx < lengths[:, None]
        self.suffix_hidden = hidden[b, idx.clamp(max=hidden.shape[1] - 1)] * suffix_valid[..., None]
        self.suffix_pos = idx.masked_fill(~suffix_valid, 0)
        self.mask = torch.cat([prefix_valid, suffix_valid], 1).long()
        self.start = start
        self.cache = DynamicCache(config=model.config)
        # transformers 5.2x renamed the decoder's ``past_key_values`` argument to ``cache``
        name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
        self.cache_kwarg = {name: self.cache}
        self.upper_cache = self.cache.layers[layer + 1 :]
        if self.prefix_len:
            prefix_hidden = hidden[b, src.clamp(min=0)] * prefix_valid[..., None]
            with torch.no_grad():
                self._run(prefix_hidden, src.clamp(min=0), prefix_valid.long())
            # The lower layers never run, but masks are sized from cache layer 0: give them the prefix length.
            first = self.upper_cache[0]
            for lower in self.cache.layers[: layer + 1]:
                lower.lazy_initialization(first.keys, first.values)
                lower.keys, lower.values = first.keys, first.values

    def _run(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dummy = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)  # embeddings are replaced by `x`
        with blocks_from(self.model, self.layer, x):
            return self.model.base_model(
                input_ids=dummy, attention_mask=mask, position_ids=positions, use_cache=True, **self.cache_kwarg
            )[0]

    def __call__(self, shift: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(B, S, d)`` of the suffix positions when row ``b`` is shifted by ``shift[b]``."""
        x = self.suffix_hidden.clone()
        x[:, 0] += shift
        try:
            return self._run(x, self.suffix_pos, self.mask)
        finally:
            for cached in self.upper_cache:  # forget the suffix (and its graph), keep the prefix for the next call
                cached.keys = cached.keys[..., : self.prefix_len, :].detach()
                cached.values = cached.values[..., : self.prefix_len, :].detach()


StopRule = Literal["loss", "argmax"]
KLVariant = Literal["release", "last_token"]


def essence_kl(
    log_p_edited: torch.Tensor, log_p_original: torch.Tensor, variant: KLVariant = "release"
) -> torch.Tensor:
    """``(N,)`` KL term of the target loss from log-probabilities ``(N, V)`` on the essence rows.

    ``release`` (MEMIT/AlphaEdit/LyapLock ``compute_z``): ``KL(p_edited || p_original)``, the edited distribution first,
    taken at the subject's last token of ``"{subject} is a"``. ``last_token`` (this project's earlier variant):
    ``KL(p_original || p_edited)`` at the last prompt token. The position is chosen by the caller.
    """
    if variant == "release":
        return (log_p_edited.exp() * (log_p_edited - log_p_original)).sum(-1)
    return (log_p_original.exp() * (log_p_original - log_p_edited)).sum(-1)


@dataclass
class TargetResult:
    """Targets of one step. ``z: (d, n)``; per request: optimisation steps used and final target probability."""

    z: torch.Tensor
    steps: list[int]
    prob: list[float]
    tokens: int  # suffix positions run through the upper blocks (forward + backward), summed over iterations


def compute_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    lr: float = 0.5,
    steps: int = 25,
    kl_factor: float = 0.0625,
    weight_decay: float = 0.5,
    clamp_norm_factor: float = 0.75,
    stop_rule: StopRule = "loss",
    stop_loss: float = 5e-2,
    stop_prob: float = 0.95,
    kl_variant: KLVariant = "release",
) -> TargetResult:
    """MEMIT's target vectors for all requests of a step, optimised in one batch (DESIGN.md section 4).

    For each request a shift ``delta`` is added to the residual stream after block ``layer`` at the last subject token
    of every template row and of the essence row ``"{subject} is a"``. Loss per request: mean target NLL over the
    template rows + ``kl_factor`` KL on the essence row (:func:`essence_kl`) + ``weight_decay * ||delta|| / ||h0||^2``;
    ``||delta|| <= clamp_norm_factor * ||h0||``. A request stops (and leaves the batch) by ``stop_rule``: ``loss``
    (the releases': its total loss is below ``stop_loss``) or ``argmax`` (this project's: its new target is the argmax
    at every target token of every template and its geometric-mean probability reaches ``stop_prob``).
    """
    n, n_t = len(requests), len(templates)
    prompts = [t.replace("{}", r.prompt).replace("{}", r.subject, 1) for r in requests for t in templates]
    prompts += [f"{r.subject} is a" for r in requests]
    subjects = [r.subject for r in requests for _ in templates] + [r.subject for r in requests]
    targets: list[str | None] = [r.target_new for r in requests for _ in templates] + [None] * n
    dev = model.device
    rows = encode_rows(tokenizer, prompts, subjects, targets, device=dev)
    owner = torch.cat([torch.arange(n).repeat_interleave(n_t), torch.arange(n)]).to(dev)  # request of each row
    is_kl = torch.cat([torch.zeros(n * n_t, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]).to(dev)

    block = f"{architecture_of(model).blocks}.{layer}"
    with torch.no_grad():
        hidden = capture(model, rows, {block: "output"})[block]  # (B, T, d): residual stream after `layer`, run once
        kl_rows = rows.select(is_kl.nonzero()[:, 0])
        final = model.base_model(input_ids=kl_rows.input_ids, attention_mask=kl_rows.attention_mask)[0]
        kl_pos = kl_rows.subject_pos if kl_variant == "release" else kl_rows.last_prompt_pos
        kl_init = log_softmax_at(model, final[torch.arange(n, device=dev), kl_pos])  # (n, V)
    first_rows = torch.arange(0, n * n_t, n_t, device=dev)  # the bare-prompt row ("{}" template) of each request
    h0 = hidden[first_rows, rows.subject_pos[first_rows]]  # (n, d)
    max_norm = clamp_norm_factor * h0.norm(dim=1, keepdim=True)

    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    used, prob, tokens = [steps] * n, torch.zeros(n, device=dev), 0
    runner_for: tuple[torch.Tensor, _ShiftedSuffix] | None = None
    for step in range(steps):
        sel = active[owner].nonzero()[:, 0]
        sub, sub_owner, sub_kl = rows.select(sel), owner[sel], is_kl[sel]
        if runner_for is None or not torch.equal(runner_for[0], sel):  # the prefix cache follows the active rows
            runner_for = (sel, _ShiftedSuffix(model, layer, hidden[sel], sub))
        runner = runner_for[1]
        out = runner(delta[sub_owner])  # (B, S, d), suffix coordinates: position p is p - start
        tokens += int(runner.mask[:, runner.prefix_len :].sum())
        r, p, ids = sub.target_positions()  # essence rows have no targets
        log_p = log_softmax_at(model, out[r, p - runner.start[r]])  # (N_tokens, V)
        token_lp = log_p.gather(1, ids[:, None])[:, 0]
        tok_owner = sub_owner[r]
        nll = mean_per_row(-token_lp, tok_owner, n)
        kl_idx = sub_kl.nonzero()[:, 0]
        kl_pos = (sub.subject_pos if kl_variant == "release" else sub.last_prompt_pos)[kl_idx]
        kl_lp = log_softmax_at(model, out[kl_idx, kl_pos - runner.start[kl_idx]])
        kl = torch.zeros(n, device=dev).index_add(
            0, sub_owner[kl_idx], essence_kl(kl_lp, kl_init[sub_owner[kl_idx]], kl_variant)
        )
        decay = weight_decay * delta.norm(dim=1) / h0.norm(dim=1) ** 2
        total = nll + kl_factor * kl + decay  # (n,)
        with torch.no_grad():
            prob[active] = (-nll[active]).exp()
            if stop_rule == "loss":
                done = active & (total < stop_loss)
            else:
                lost = torch.zeros(n, device=dev).index_add(0, tok_owner, (log_p.argmax(-1) != ids).float())
                done = active & (lost == 0) & (prob >= stop_prob)
            for i in done.nonzero()[:, 0].tolist():
                used[i] = step
            active &= ~done
        if not active.any():
            break
        loss = total[active].sum()  # requests are independent: the sum keeps their gradients apart
        kept = delta.detach().clone()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            delta[~active] = kept[~active]  # Adam momentum must not move finished requests
            norm = delta.norm(dim=1, keepdim=True)
            delta.mul_(torch.where(norm > max_norm, max_norm / norm, torch.ones_like(norm)))
    return TargetResult(z=(h0 + delta.detach()).T, steps=used, prob=prob.tolist(), tokens=tokens)
