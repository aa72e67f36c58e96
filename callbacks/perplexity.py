"""``HeldOutPerplexity``: token-level perplexity of held-out text at every evaluation (general ability under editing).

PRUNE (arXiv 2405.16821) argues that sequential edits degrade the model's general abilities; the curve of held-out
perplexity against the number of edits measures that degradation directly, for every method. The held-out text is a
``.txt``/``.jsonl`` file read like a C0 corpus (:mod:`editing.corpus`), or a sample of the unedited model itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import PositiveInt, restricted_number_type
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from transformers import PreTrainedModel
from typing_extensions import override

from editing.arguments import check_arguments
from editing.corpus import file_texts, load_corpus
from editing.distributed import share, sum_across
from editing.rows import pad_right
from editing.stats import token_chunks

HeldOutTokens = restricted_number_type("HeldOutTokens", int, (">=", 2))  # one token to predict from another
ChunkLength = restricted_number_type("ChunkLength", int, (">=", 8))  # token_chunks drops pieces under 8 tokens


@torch.no_grad()
def held_out_perplexity(
    model: PreTrainedModel, chunks: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8
) -> float:
    """``exp(total NLL / predicted tokens)`` of ``chunks`` (token ids) under ``model``.

    Every token of a chunk but its first is predicted from the ones before it; chunks are right-padded into batches
    and the padding is masked out of the attention and of the sum, so the value does not depend on ``batch_size``.
    In a multi-process run each rank scores its share of the chunks and the sums are all-reduced (collective).
    """
    nll, count = 0.0, 0
    mine = share(chunks)
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        ids, mask = pad_right(batch, pad_token_id, model.device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (b, width, vocab)
        predicted = mask[:, 1:].bool()  # (b, width - 1): targets that are real tokens
        scores = logits[:, :-1][predicted].double()  # (tokens, vocab), only the predicted positions upcast
        nll += float(F.cross_entropy(scores, ids[:, 1:][predicted], reduction="sum"))
        count += int(predicted.sum())
    nll, count = sum_across(torch.tensor([nll, count], dtype=torch.float64, device=model.device)).tolist()
    if count == 0:
        raise ValueError("held-out perplexity: no token to predict (every chunk is shorter than two tokens)")
    return math.exp(nll / count)


class HeldOutPerplexity(Callback):
    """Logs ``val/perplexity`` of held-out text at the end of every evaluation and keeps its history.

    The text is cut once into fixed chunks of at most ``seq_len`` tokens (``tokens`` in all; a text is cut, never
    joined with another, and pieces shorter than 8 tokens are dropped, as for C0), so every evaluation scores the same
    tokens. Perplexity is ``exp`` of the summed next-token NLL over the summed number of predicted tokens (all tokens
    of a chunk but its first). It is measured once before the first edit (at fit start, logged at ``edits/total`` 0)
    and at every evaluation; :attr:`history` holds ``{"edits", "perplexity"}`` of each (sanity checks skipped), is
    checkpointed, and :class:`~callbacks.report.RunReport` writes it into ``summary.json`` (``curves``).

    With :class:`~callbacks.prune.PruneRestraint` in ``posthoc`` mode it measures the restrained weights wherever it
    stands in ``trainer.callbacks``: PRUNE swaps them in at ``on_validation_start`` and out at ``on_validation_end``.

    Args:
        path: a ``.txt`` (one text per non-empty line, WikiText ``= headings =`` skipped) or ``.jsonl`` (``"text"``
            field) file of held-out text. ``None``: sample ``tokens`` tokens from the unedited model (at
            ``on_fit_start``, or ``on_validation_start`` of a ``validate`` run; cached like the C0 sample, see
            :func:`editing.corpus.load_corpus`).
        tokens: number of tokens evaluated (the cost of one evaluation is one forward pass over them); at least 2.
        seq_len: tokens per chunk, i.e. the longest context scored; at least 8 (shorter pieces are dropped).
        batch_size: chunks per forward pass.
        seed: seed of the model sample (``path=None``). It must differ from the editing method's ``seed`` (default
            0) when C0 is also sampled from the model, or the held-out text would be the C0 text.
    """

    @check_arguments
    def __init__(
        self,
        path: str | None = None,
        tokens: HeldOutTokens = 5000,
        seq_len: ChunkLength = 256,
        batch_size: PositiveInt = 8,
        seed: int = 1,
    ) -> None:
        if path is not None:
            file = Path(path).expanduser()
            if file.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"path: expected a .txt or .jsonl file, got '{path}'")
            if not file.is_file():
                raise ValueError(f"path: file '{path}' does not exist")
        self.path = path
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.chunks: list[list[int]] | None = None  # built once, from the unedited model's sample or the file
        self.history: list[dict[str, Any]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path, tokens=self.tokens, seq_len=self.seq_len, seed=self.seed)

    def _texts(self, pl_module: LightningModule) -> list[str]:
        if self.path is not None:
            try:
                return file_texts(Path(self.path).expanduser())
            except ValueError as err:
                raise ValueError(f"path: {str(err).removeprefix('stats_corpus: ')}") from err
        if int(pl_module.edits_done) > 0:
            raise ValueError(
                "path: the model already holds edits and the checkpoint has no held-out sample of the unedited model; "
                "give a held-out file, or add the callback from the start of the stream"
            )
        method = getattr(pl_module, "method", None)
        if getattr(method, "stats_corpus", None) == "model" and getattr(method, "seed", None) == self.seed:
            rank_zero_warn(f"HeldOutPerplexity: seed {self.seed} samples the C0 corpus text itself; use another seed")
        texts, _ = load_corpus(
            "model", pl_module.model, pl_module.tokenizer, self.tokens, self.seed, pl_module.cache_dir
        )
        return texts

    def _ensure_chunks(self, pl_module: LightningModule) -> None:
        if self.chunks is not None:
            return
        chunks = token_chunks(pl_module.tokenizer, self._texts(pl_module), self.tokens, self.seq_len)
        if not chunks:
            raise ValueError(f"path: no held-out text of at least 8 tokens in {self.path or 'the model sample'}")
        self.chunks = chunks

    def compute(self, pl_module: LightningModule) -> float:
        """Perplexity of the held-out chunks under the current weights (without logging it)."""
        self._ensure_chunks(pl_module)
        return held_out_perplexity(pl_module.model, self.chunks, pl_module.tokenizer.pad_token_id or 0, self.batch_size)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_chunks(pl_module)
        if int(pl_module.edits_done) > 0 or any(h["edits"] == 0 for h in self.history):
            return  # resumed: the unedited baseline is measured once
        # The point before the first edit. `self.log` is not allowed in on_fit_start: straight to the loggers.
        value = self.compute(pl_module)
        self.history.append({"edits": 0, "perplexity": value})
        for logger in trainer.loggers:
            logger.log_metrics({"val/perplexity": value, "edits/total": 0.0}, step=trainer.global_step)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_chunks(pl_module)  # a `validate` run has no on_fit_start

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = self.compute(pl_module)
        self.history.append({"edits": int(pl_module.edits_done), "perplexity": value})
        pl_module.log("val/perplexity", value, sync_dist=True)  # equal on every rank: no warning

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "chunks": self.chunks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.chunks = state_dict.get("chunks") or self.chunks
