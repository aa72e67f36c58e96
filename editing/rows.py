"""Text as model input: prompts (+ teacher-forced targets) tokenised once into right-padded rows, with the positions
every editing step and metric needs (the last subject token, the last prompt token, the target tokens).

Used by the locate-then-edit toolkit, the statistics, the metrics and every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from editing.requests import EditRequest


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


def mean_per_row(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``(n_rows,)`` mean of ``values`` grouped by ``row`` (0 for a row without values)."""
    total = torch.zeros(n_rows, device=values.device, dtype=values.dtype).index_add(0, row, values)
    count = torch.zeros(n_rows, device=values.device, dtype=values.dtype).index_add(0, row, torch.ones_like(values))
    return total / count.clamp(min=1)


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest row the model takes (Llama-style and GPT-2-style configs), or None where the config names none."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_lengths(
    requests: Sequence[EditRequest],
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainedConfig,
    templates: Sequence[str] = (),
) -> None:
    """Refuse, before any editing, a request whose longest row would not fit the model's positions.

    The rows an edit step and its evaluation build are a context template's prefix, a prompt (the request's own, its
    paraphrases, its locality and generation prompts) and its answer; the longest prefix of ``templates`` is counted
    for every prompt. A prompt past ``max_position_embeddings`` would fail deep in the model, or grind for hours on a
    CPU (a 200,000-character subject), so it fails here with one line naming the record and the field.
    """
    limit = max_positions(config)
    if not limit:
        return
    prefix = max((len(tokenizer(t.replace("{}", ""))["input_ids"]) for t in templates), default=0)
    for index, r in enumerate(requests):
        rows = {"prompt + target_new": (r.text, r.target_new)}
        rows.update({f"rephrase_prompts[{i}]": (p, r.target_new) for i, p in enumerate(r.rephrase_prompts)})
        rows.update({f"locality[{i}]": (p.prompt, p.answer) for i, p in enumerate(r.locality)})
        rows.update({f"generation_prompts[{i}]": (p, "") for i, p in enumerate(r.generation_prompts)})
        for field, (prompt, answer) in rows.items():
            # a token holds at least one byte (byte-level BPE, SentencePiece with byte fallback), plus BOS and a
            # space: only texts that could be too long are tokenised
            if len(prompt.encode()) + len(answer.encode()) + prefix + 2 < limit:
                continue
            length = prefix + len(tokenizer(prompt)["input_ids"]) + len(target_token_ids(tokenizer, answer or " "))
            if length > limit:
                raise ValueError(
                    f"request {index} (case_id {r.case_id}): field '{field}' needs {length} positions with the "
                    f"longest context template; the model takes {limit}"
                )
