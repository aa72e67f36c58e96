"""The locate-then-edit toolkit shared by MEMIT, AlphaEdit and LyapLock (DESIGN.md section 4).

- :func:`generate_context_templates`: short model-written prefixes, so targets and keys do not depend on one phrasing.
- :func:`encode_rows`: prompts (+ targets) tokenised once, with the position of the last subject token.
- :func:`capture`: inputs or outputs of named modules at chosen positions, stopping the forward pass after the last one.
- :func:`compute_keys`: MLP keys ``k`` (input of the edited projection at the last subject token, template-averaged).
- :func:`compute_targets`: the MEMIT target ``z = h0 + delta`` for every request of a step, optimised together.
- :func:`spread_residual`: the share of ``z - h`` that layer ``i`` of ``n`` must write.

Speed (DESIGN.md section 9): the target optimisation runs the blocks below the shift point once without gradient, then
only the blocks above it, and applies the LM head at target positions only; finished requests leave the batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from editing.models import architecture_of, sample_text
from editing.requests import EditRequest


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


@dataclass
class EncodedRows:
    """A right-padded batch of prompts, optionally followed by target tokens (teacher forcing).

    Attributes:
        input_ids, attention_mask: ``(B, T)``.
        subject_pos: ``(B,)`` index of the last subject token, or -1 where the row has no subject.
        last_prompt_pos: ``(B,)`` index of the last prompt token (its logits predict the first target token).
        target_ids: ``(B, S)`` target token ids, padded with -100; ``S`` = longest target (0 without targets).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor
    last_prompt_pos: torch.Tensor
    target_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> EncodedRows:
        """The sub-batch of ``rows``, trimmed to its own longest row."""
        width = int(self.attention_mask[rows].sum(1).max())
        return EncodedRows(
            self.input_ids[rows, :width],
            self.attention_mask[rows, :width],
            self.subject_pos[rows],
            self.last_prompt_pos[rows],
            self.target_ids[rows],
        )

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, positions, ids)`` of every real target token: logits at ``positions`` must predict ``ids``."""
        s = self.target_ids.shape[1]
        pos = self.last_prompt_pos[:, None] + torch.arange(s, device=self.target_ids.device)[None]  # (B, S)
        valid = self.target_ids >= 0
        rows = torch.arange(len(self), device=pos.device)[:, None].expand_as(pos)
        return rows[valid], pos[valid], self.target_ids[valid]


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask``, both ``(B, longest)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def target_token_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target as it continues a prompt: with one leading space and never a BOS."""
    return tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]


def encode_rows(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    subjects: Sequence[str | None] | None = None,
    targets: Sequence[str | None] | None = None,
    device: torch.device | str = "cpu",
) -> EncodedRows:
    """Tokenise ``prompt (+ target[:-1])`` rows, recording the last subject token and the target positions.

    The prompt and target are tokenised separately and concatenated, so the scored ids are exactly the target's. The
    last subject token is found by tokenising the prompt up to the end of the subject's last occurrence (MEMIT's
    ``subject_last`` lookup).
    """
    n = len(prompts)
    subjects = subjects or [None] * n
    targets = targets or [None] * n
    rows: list[list[int]] = []
    subject_pos, last_prompt_pos, target_lists = [], [], []
    for prompt, subject, target in zip(prompts, subjects, targets, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        if subject is None:
            subject_pos.append(-1)
        else:
            end = prompt.rindex(subject) + len(subject)
            subject_pos.append(len(tokenizer(prompt[:end])["input_ids"]) - 1)
        tgt = target_token_ids(tokenizer, target) if target is not None else []
        rows.append(prompt_ids + tgt[:-1])
        last_prompt_pos.append(len(prompt_ids) - 1)
        target_lists.append(tgt)
    input_ids, attention_mask = pad_right(rows, tokenizer.pad_token_id, device)
    s = max(len(t) for t in target_lists)
    target_ids = torch.full((n, s), -100, dtype=torch.long)
    for i, tgt in enumerate(target_lists):
        target_ids[i, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return EncodedRows(
        input_ids,
        attention_mask,
        torch.tensor(subject_pos, device=device),
        torch.tensor(last_prompt_pos, device=device),
        target_ids.to(device),
    )


class _StopForward(Exception):
    """Raised by a hook once every module of interest has run: the rest of the network need not run."""


def forward_until(model: PreTrainedModel, module_names: Sequence[str], **inputs: torch.Tensor) -> None:
    """Run ``model(**inputs)`` only until every named module has produced its output (hooks do the recording)."""
    pending = set(module_names)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            pending.discard(name)
            if not pending:
                raise _StopForward

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in module_names]
    try:
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
) -> dict[str, torch.Tensor]:
    """Inputs or outputs of modules, at one position per row (or every position when ``positions`` is None).

    Args:
        modules: module path -> ``"input"`` or ``"output"``.
        positions: ``(B,)`` token index per row.

    Returns:
        module path -> ``(B, d)`` (or ``(B, T, d)`` without positions). The forward pass stops after the last module.
    """
    found: dict[str, torch.Tensor] = {}
    batch_index = torch.arange(len(rows), device=rows.input_ids.device)

    def make_hook(name: str, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            x = _first_tensor(args if kind == "input" else output)
            found[name] = (x if positions is None else x[batch_index, positions]).detach()

        return hook

    handles = [model.get_submodule(n).register_forward_hook(make_hook(n, kind)) for n, kind in modules.items()]
    try:
        forward_until(model, list(modules), input_ids=rows.input_ids, attention_mask=rows.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return found


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


def log_softmax_at(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float32) from final hidden states ``(N, d)``; the LM head runs on these only."""
    return model.get_output_embeddings()(hidden).float().log_softmax(-1)


def target_log_probs(model: PreTrainedModel, rows: EncodedRows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced ``(log_p (N_tokens, V), row (N_tokens,), id (N_tokens,))`` at every real target token of
    ``rows``; gradients flow when enabled."""
    hidden = model.base_model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False)[0]
    r, p, ids = rows.target_positions()
    return log_softmax_at(model, hidden[r, p]), r, ids


def mean_per_row(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``(n_rows,)`` mean of ``values`` grouped by ``row`` (0 for a row without values)."""
    total = torch.zeros(n_rows, device=values.device, dtype=values.dtype).index_add(0, row, values)
    count = torch.zeros(n_rows, device=values.device, dtype=values.dtype).index_add(0, row, torch.ones_like(values))
    return total / count.clamp(min=1)


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
