"""WISE's memory management and routing diagnostics (DESIGN.md section 6), as callbacks on a ``WISE`` run.

- :class:`WiseMemory`: knowledge sharding and merging. Every ``save_freq`` edits the current shard is saved and the
  side memory restarts (from the last merged memory) under the next shard's random gradient mask; every
  ``merge_freq`` edits the saved shards are TIES-merged. WISE-Merge keeps one memory; WISE-Retrieve seals each merged
  memory with its own threshold and starts a fresh one, and the router picks among them per query.
- :class:`RoutingMonitor`: at every evaluation, the routing scores of the edited prompts, their paraphrases and the
  unrelated (locality) prompts relative to the threshold, and the share of each that the side memory answers.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from editing.methods.wise import WISE


def _wise(pl_module: LightningModule, owner: str) -> WISE:
    method = getattr(pl_module, "method", None)
    if not isinstance(method, WISE):
        raise ValueError(f"{owner}: needs model.method to be editing.methods.WISE, got {type(method).__name__}")
    return method


class WiseMemory(Callback):
    """Shard saves and TIES merges of WISE's side memory, and the export of the edited model.

    Args:
        save_freq: edits per knowledge shard (WISE: 500).
        merge_freq: edits between merges; a multiple of ``save_freq`` (WISE: 1000, i.e. two shards per merge).
        retrieve: WISE-Retrieve (each merge seals one more memory) instead of WISE-Merge (one memory).
        ties_density: fraction of each shard's largest entries kept by TIES' trim step (0.53).
        export_dir: at the end of ``fit``, save the model, tokenizer and side memories here
            (reload with :func:`editing.side_memory.load_edited`).
    """

    def __init__(
        self,
        save_freq: int = 500,
        merge_freq: int = 1000,
        retrieve: bool = False,
        ties_density: float = 0.53,
        export_dir: str | None = None,
    ) -> None:
        if save_freq < 1:
            raise ValueError(f"save_freq: must be >= 1, got {save_freq}")
        if merge_freq < 1 or merge_freq % save_freq:
            raise ValueError(f"merge_freq: must be a positive multiple of save_freq ({save_freq}), got {merge_freq}")
        if not 0 < ties_density <= 1:
            raise ValueError(f"ties_density: must be in (0, 1], got {ties_density}")
        self.save_freq, self.merge_freq, self.retrieve = save_freq, merge_freq, retrieve
        self.ties_density, self.export_dir = ties_density, export_dir
        self.merges = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(save_freq=self.save_freq, merge_freq=self.merge_freq, retrieve=self.retrieve)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _wise(pl_module, type(self).__name__)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _wise(pl_module, type(self).__name__).memory.ties_density = self.ties_density

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        method = _wise(pl_module, type(self).__name__)
        done = int(pl_module.edits_done)
        before = done - len(batch)
        if done // self.save_freq > before // self.save_freq:
            method.memory.save_shard()
        if done // self.merge_freq > before // self.merge_freq:
            method.memory.merge(self.retrieve)
            method.refresh_thresholds()
            self.merges += 1
            rank_zero_info(f"WiseMemory: merge {self.merges} after {done} edits")
        pl_module.log_dict(
            {"wise/merges": float(self.merges), "wise/memories": float(len(method.memory.answering()))},
            batch_size=len(batch),
        )

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is not None and trainer.is_global_zero:
            _wise(pl_module, type(self).__name__).export(self.export_dir)
            rank_zero_info(f"WiseMemory: exported the edited model to {self.export_dir}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"merges": self.merges}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.merges = state_dict.get("merges", 0)


class RoutingMonitor(Callback):
    """Logs how WISE routes the evaluation inputs: for ``edit`` (edited prompt + new target), ``paraphrase`` and
    ``unrelated`` (locality prompt + answer) rows, the 10/50/90% quantiles of ``score / threshold`` of the best
    memory (> 1 routes to the side memory) and the share routed, as ``routing/<kind>/...``; plus the lowest threshold.
    """

    QUANTILES = (0.1, 0.5, 0.9)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _wise(pl_module, type(self).__name__)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        method = _wise(pl_module, type(self).__name__)
        done = int(pl_module.edits_done)
        requests = trainer.datamodule.requests[:done]
        if not requests or not method.memory.answering():
            return
        kinds = {
            "edit": [(r.text, r.target_new) for r in requests],
            "paraphrase": [(p, r.target_new) for r in requests for p in r.rephrase_prompts],
            "unrelated": [(p.prompt, p.answer) for r in requests for p in r.locality],
        }
        values = {}
        for kind, texts in kinds.items():
            if not texts:
                continue
            scores, thresholds = method.scores_of(texts)
            ratio = (scores.cpu() / thresholds[:, None]).amax(0)
            for q, value in zip(self.QUANTILES, torch.quantile(ratio, torch.tensor(self.QUANTILES)), strict=True):
                values[f"routing/{kind}/q{int(q * 100)}"] = float(value)
            values[f"routing/{kind}/routed"] = float((ratio > 1).float().mean())
        values["routing/threshold"] = float(thresholds.min())
        pl_module.log_dict(values)
