"""``EvalSamples``: what the model answers to the edited prompts, as a W&B table at every evaluation."""

from __future__ import annotations

from itertools import islice
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from editing.metrics import score_targets

COLUMNS = ["case_id", "prompt", "target", "prediction", "hit"]


class EvalSamples(Callback):
    """At every evaluation, the first ``count`` rewrite prompts it scores as a W&B table ``val/samples``: the prompt,
    the new target, the model's greedy top-1 tokens at the target positions (teacher-forced, decoded) and the hit
    (``counterfact``: ``target_new`` is more likely than ``target_true``; ``token``: the share of right tokens). Only
    runs when a ``WandbLogger`` is attached; the table is logged through every one.

    The rows are taken while the evaluation runs (at its first batch, with the weights it scores: PRUNE's restrained
    ones), and logged when it ends.

    Args:
        count: rows per table (the edits that come first in the stream among those the evaluation scores).
        key: the table's name in W&B.
    """

    def __init__(self, count: int = 20, key: str = "val/samples") -> None:
        if count < 1:
            raise ValueError(f"EvalSamples: count must be at least 1, got {count}")
        self.count = count
        self.key = key
        self._rows: list[list[Any]] = []

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or batch_idx != 0 or not trainer.is_global_zero or not _wandb_loggers(trainer):
            return
        self._rows = self.rows(pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._rows or not trainer.is_global_zero:
            return
        for logger in _wandb_loggers(trainer):
            logger.log_table(key=self.key, columns=COLUMNS, data=self._rows, step=trainer.global_step)
        self._rows = []

    def rows(self, pl_module: LightningModule) -> list[list[Any]]:
        """The table's rows for the module as it is now: the first ``count`` requests this evaluation scores."""
        stream, done = pl_module.stream, int(pl_module.edits_done)
        every = done == 0 or stream.scored == "all"
        scored = (r for i, r in enumerate(stream.requests) if (every or i < done) and pl_module._in_sample(i))
        requests = list(islice(scored, self.count))
        if not requests:
            return []
        model, tokenizer = pl_module.model, pl_module.tokenizer
        prompts = [r.text for r in requests]
        new = score_targets(model, tokenizer, prompts, [r.target_new for r in requests])
        if stream.metric_family == "counterfact":
            true = score_targets(model, tokenizer, prompts, [r.target_true or "" for r in requests])
            hits = [bool(h) for h in (new.nll < true.nll).tolist()]
        else:
            hits = [round(float(c.float().mean()), 4) for c in new.correct]
        predictions = [tokenizer.decode(p.tolist()) for p in new.predictions]
        return [
            [r.case_id, prompt, r.target_new, prediction, hit]
            for r, prompt, prediction, hit in zip(requests, prompts, predictions, hits, strict=True)
        ]


def _wandb_loggers(trainer: Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
