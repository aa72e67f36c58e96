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

from editing.forward import attention_implementation, blocks_from, capture, log_softmax_at, token_log_probs
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


def _key_rows(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str], device: torch.device
) -> EncodedRows:
    """Every template filled with every request's prompt, request-major (the bare ``"{}"`` template first)."""
    prompts = [t.replace("{}", r.prompt).replace("{}", r.subject, 1) for r in requests for t in templates]
    subjects = [r.subject for r in requests for _ in templates]
    return encode_rows(tokenizer, prompts, subjects, device=device)


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
    rows = _key_rows(tokenizer, requests, templates, model.device)
    k = capture(model, rows, {module_name: "input"}, rows.subject_pos, length_buckets=4)[module_name]  # (n * n_t, d_k)
    return average_template_keys(k.view(len(requests), len(templates), -1), averaging).T


def layer_output_at_subject(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], layer: int
) -> torch.Tensor:
    """``h: (d, n)``, the residual stream after block ``layer`` at the last subject token of each bare prompt."""
    block = f"{architecture_of(model).blocks}.{layer}"
    rows = encode_rows(tokenizer, [r.text for r in requests], [r.subject for r in requests], device=model.device)
    return capture(model, rows, {block: "output"}, rows.subject_pos, length_buckets=4)[block].T


class LayerWalk:
    """Keys and residuals of the edited layers in order, while the caller updates each layer in turn.

    :func:`compute_keys` for layer ``i`` after layers below it were updated reruns every block up to ``i``: summed
    over five layers, 30 block passes of every template row. The walk keeps the residual stream before the layer it
    is at and runs each block only to move past it (13 passes for blocks 3-7): the same keys, from the same weights.
    The caller must update layers in ascending order and call :meth:`keys` before changing layer ``i``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        templates: Sequence[str],
        averaging: KeyAveraging = "release",
    ) -> None:
        self.model, self.averaging, self.n, self.n_t = model, averaging, len(requests), len(templates)
        self.rows = _key_rows(tokenizer, requests, templates, model.device)
        self.blocks = architecture_of(model).blocks
        self.below, self.hidden = -1, None  # residual stream after block `below` (-1: the start of the model)

    def _capture(self, rows: torch.Tensor, modules: dict[str, str], positions: torch.Tensor | None = None) -> dict:
        sub = self.rows.select(rows)
        above = None if self.hidden is None else (self.below, self.hidden[rows, : sub.input_ids.shape[1]])
        return capture(self.model, sub, modules, positions, above=above)

    def keys(self, layer: int, module_name: str) -> torch.Tensor:
        """``K: (d_k, n)`` of the projection ``module_name`` in block ``layer``, with the weights as they are now."""
        everyone = torch.arange(len(self.rows), device=self.rows.input_ids.device)
        modules = {module_name: "input"}
        if layer - 1 > self.below:
            modules[f"{self.blocks}.{layer - 1}"] = "output"
        found = self._capture(everyone, modules)
        if layer - 1 > self.below:
            self.below, self.hidden = layer - 1, found[f"{self.blocks}.{layer - 1}"]
        k = found[module_name][everyone, self.rows.subject_pos]
        return average_template_keys(k.view(self.n, self.n_t, -1), self.averaging).T

    def output_at_subject(self, layer: int) -> torch.Tensor:
        """``h: (d, n)``: the residual stream after block ``layer`` at the last subject token of each bare prompt."""
        bare = torch.arange(0, self.n * self.n_t, self.n_t, device=self.rows.input_ids.device)
        block = f"{self.blocks}.{layer}"
        if layer == self.below:
            return self.hidden[bare, self.rows.subject_pos[bare]].T
        return self._capture(bare, {block: "output"}, self.rows.subject_pos[bare])[block].T


def spread_residual(z: torch.Tensor, h: torch.Tensor, i: int, n_layers: int) -> torch.Tensor:
    """MEMIT's residual spreading: edited layer ``i`` (0-based, in order) of ``n_layers`` writes ``(z - h)/(n - i)``."""
    return (z - h) / (n_layers - i)


_PREFIX_GROUPS = 4  # prefix runs, rows grouped by prefix length (one left-padded batch ran ~1.75x the real tokens)


class _ShiftedSuffix:
    """The blocks above ``layer`` for rows whose residual stream is shifted at one position each.

    Positions before a row's shift position do not depend on the shift: their keys and values in the upper blocks are
    computed once, for every row, without gradient. Each optimisation iteration then runs only the positions from the
    shift on, for the rows still active, in buckets of equal suffix length (no padding: padding every suffix to the
    longest ran ~3x the real tokens); a bucket's cache is its rows' slice of the prefix keys and values, trimmed to
    its longest prefix. Prefixes are left-padded, with explicit position ids. On CPU the blocks run with plain matmul
    attention (:func:`~editing.forward.attention_implementation`).

    ``runner`` holds the upper blocks and LM head that run (the edited model itself, or a reduced-precision copy of
    it: blocks above the shift layer are never edited by locate-then-edit).
    """

    def __init__(self, runner: PreTrainedModel, layer: int, hidden: torch.Tensor, rows: EncodedRows) -> None:
        self.runner, self.layer, dev = runner, layer, hidden.device
        dtype = runner.get_output_embeddings().weight.dtype
        b = torch.arange(len(rows), device=dev)[:, None]
        self.start, lengths = rows.subject_pos, rows.attention_mask.sum(1)
        self.width = lengths - self.start  # suffix length of each row
        self.prefix_len = int(self.start.max())
        idx = self.start[:, None] + torch.arange(int(self.width.max()), device=dev)[None]  # (B, S)
        self.suffix_hidden = hidden[b, idx.clamp(max=hidden.shape[1] - 1)].to(dtype)
        self.suffix_pos = idx
        src = torch.arange(self.prefix_len, device=dev)[None] - (self.prefix_len - self.start[:, None])  # (B, P)
        self.prefix_valid = src >= 0
        name = "cache" if "cache" in inspect.signature(runner.base_model.forward).parameters else "past_key_values"
        self.cache_kwarg = name  # transformers 5.2x renamed the decoder's ``past_key_values`` argument to ``cache``
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.prefix_len:
            prefix_hidden = (hidden[b, src.clamp(min=0)] * self.prefix_valid[..., None]).to(dtype)
            for group in self.start.argsort().tensor_split(_PREFIX_GROUPS):  # rows of similar prefix length
                p = int(self.start[group].max()) if len(group) else 0
                if p:
                    self._add_prefix(group, prefix_hidden[group, -p:], src[group, -p:])

    def _add_prefix(self, group: torch.Tensor, x: torch.Tensor, src: torch.Tensor) -> None:
        """Keys and values of the upper blocks at the prefix positions of rows ``group`` (left-padded to ``p``)."""
        cache = DynamicCache(config=self.runner.config)
        with torch.no_grad():
            self._run(x, src.clamp(min=0), (src >= 0).long(), cache)
        kv = [(c.keys, c.values) for c in cache.layers[self.layer + 1 :]]
        if not self.prefix_kv:
            shape = lambda t: (len(self.start), t.shape[1], self.prefix_len, t.shape[3])  # noqa: E731
            self.prefix_kv = [(k.new_zeros(shape(k)), v.new_zeros(shape(v))) for k, v in kv]
        for (keys, values), (k, v) in zip(self.prefix_kv, kv, strict=True):
            keys[group, :, self.prefix_len - k.shape[2] :] = k
            values[group, :, self.prefix_len - v.shape[2] :] = v

    def _run(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        dummy = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)  # embeddings are replaced by `x`
        eager = "eager" if x.device.type == "cpu" else None
        with blocks_from(self.runner, self.layer, x), attention_implementation(self.runner, eager):
            return self.runner.base_model(
                input_ids=dummy,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_kwarg: cache},
            )[0]

    def buckets(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` grouped by suffix length."""
        width = self.width[rows]
        return [rows[width == w] for w in width.unique().tolist()]

    def __call__(self, rows: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(len(rows), S, d)`` of the suffix positions of ``rows`` (one bucket: equal suffix
        lengths ``S``) when row ``rows[i]`` is shifted by ``shift[i]``."""
        s = int(self.width[rows[0]])
        x = self.suffix_hidden[rows, :s].clone()
        x[:, 0] += shift.to(x.dtype)
        cache = DynamicCache(config=self.runner.config)
        p = int(self.start[rows].max())  # the bucket's longest prefix; columns before it are padding for every row
        if p:
            upper = [(k[rows, :, self.prefix_len - p :], v[rows, :, self.prefix_len - p :]) for k, v in self.prefix_kv]
            # The lower layers never run, but masks are sized from cache layer 0: give them the prefix length.
            for i, cached in enumerate(cache.layers):
                cached.update(*upper[max(i - self.layer - 1, 0)])
        suffix_pos = self.suffix_pos[rows, :s]
        mask = torch.cat([self.prefix_valid[rows, self.prefix_len - p :], torch.ones_like(suffix_pos)], 1)
        return self._run(x, suffix_pos, mask.long(), cache)


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
    runner: PreTrainedModel | None = None,
) -> TargetResult:
    """MEMIT's target vectors for all requests of a step, optimised in one batch (DESIGN.md section 4).

    For each request a shift ``delta`` is added to the residual stream after block ``layer`` at the last subject token
    of every template row and of the essence row ``"{subject} is a"``. Loss per request: mean target NLL over the
    template rows + ``kl_factor`` KL on the essence row (:func:`essence_kl`) + ``weight_decay * ||delta|| / ||h0||^2``;
    ``||delta|| <= clamp_norm_factor * ||h0||``. A request stops (and leaves the batch) by ``stop_rule``: ``loss``
    (the releases': its total loss is below ``stop_loss``) or ``argmax`` (this project's: its new target is the argmax
    at every target token of every template and its geometric-mean probability reaches ``stop_prob``).

    ``runner``: the model that runs the blocks above ``layer`` and the LM head (default ``model``), for example a
    bfloat16 copy (:func:`reduced_precision_copy`); the residual stream below, ``h0`` and the targets stay in the
    model's precision.
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
        hidden = capture(model, rows, {block: "output"}, length_buckets=4)[block]  # (B, T, d): after `layer`, once
    first_rows = torch.arange(0, n * n_t, n_t, device=dev)  # the bare-prompt row ("{}" template) of each request
    h0 = hidden[first_rows, rows.subject_pos[first_rows]]  # (n, d)
    max_norm = clamp_norm_factor * h0.norm(dim=1, keepdim=True)
    head = runner or model  # what runs the upper blocks and the LM head
    suffix = _ShiftedSuffix(head, layer, hidden, rows)
    # what the loss reads, as suffix coordinates (position p of row r is p - start[r]): every target token...
    t_row, t_pos, t_ids = rows.target_positions()
    t_off = t_pos - suffix.start[t_row]
    # ... and the essence position of each KL row
    k_row = is_kl.nonzero()[:, 0]
    k_off = (rows.subject_pos if kl_variant == "release" else rows.last_prompt_pos)[k_row] - suffix.start[k_row]

    def final_states(sel: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final hidden states at the target tokens and at the KL rows' essence positions of the rows ``sel``, with
        ``shift`` (one per request) applied: ``(h_targets, target_index, h_kl)``, target_index into ``t_*``."""
        h_t, i_t, h_kl = [], [], torch.zeros_like(shift, dtype=suffix.suffix_hidden.dtype)
        local = torch.full((len(rows),), -1, dtype=torch.long, device=dev)
        for bucket in suffix.buckets(sel):
            out = suffix(bucket, shift[owner[bucket]])
            local[bucket] = torch.arange(len(bucket), device=dev)
            hit = (local[t_row] >= 0).nonzero()[:, 0]
            h_t.append(out[local[t_row[hit]], t_off[hit]])
            i_t.append(hit)
            hit = (local[k_row] >= 0).nonzero()[:, 0]  # KL row j belongs to request j
            h_kl = h_kl.index_add(0, hit, out[local[k_row[hit]], k_off[hit]])
            local[bucket] = -1
        return torch.cat(h_t), torch.cat(i_t), h_kl

    with torch.no_grad():  # the essence distribution before the shift, from the same runner as the loss
        _, _, h_kl = final_states(torch.arange(len(rows), device=dev), torch.zeros_like(h0))
        kl_init = log_softmax_at(head, h_kl)  # (n, V): KL row j belongs to request j

    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    used, prob, tokens = [steps] * n, torch.zeros(n, device=dev), 0
    for step in range(steps):
        sel = active[owner].nonzero()[:, 0]
        tokens += int(suffix.width[sel].sum())
        h_t, i_t, h_kl = final_states(sel, delta)
        live = active.nonzero()[:, 0]
        ids, tok_owner = t_ids[i_t], owner[t_row[i_t]]
        token_lp, hit = token_log_probs(head, h_t, ids)  # no full-vocabulary log-softmax at the target tokens
        nll = mean_per_row(-token_lp, tok_owner, n)
        kl_lp = log_softmax_at(head, h_kl[live])  # the KL term reads the whole distribution, one row per request
        kl = torch.zeros(n, device=dev).index_add(0, live, essence_kl(kl_lp, kl_init[live], kl_variant))
        decay = weight_decay * delta.norm(dim=1) / h0.norm(dim=1) ** 2
        total = nll + kl_factor * kl + decay  # (n,)
        with torch.no_grad():
            prob[active] = (-nll[active]).exp()
            if stop_rule == "loss":
                done = active & (total < stop_loss)
            else:
                lost = torch.zeros(n, device=dev).index_add(0, tok_owner, (~hit).float())
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
