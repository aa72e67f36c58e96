"""``WiseMemory``: WISE's knowledge sharding and merging (DESIGN.md section 6), as a callback on a ``WISE`` run.

Every ``save_freq`` edits the current shard is saved and the working memory restarts under the next shard's random
gradient mask; every ``merge_freq`` edits the saved shards are TIES-merged. WISE-Merge keeps a merged memory (how it
carries over is the method's ``merge_style``); WISE-Retrieve seals each merged memory with its own threshold and
starts a fresh one, and the router picks among them per query. The callback decides *when*;
:meth:`editing.side_memory.SideMemory.merge` decides *how*.
"""

from __future__ import annotations

from typing import Any

from jsonargparse.typing import PositiveInt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from editing.arguments import check_arguments
from editing.methods.wise import WISE


class WiseMemory(Callback):
    """Shard saves and TIES merges of WISE's side memory, and the export of the edited model.

    Args:
        save_freq: edits per knowledge shard (WISE: 500).
        merge_freq: edits between merges; a multiple of ``save_freq`` (WISE: 1000, i.e. two shards per merge).
        retrieve: WISE-Retrieve (each merge seals one more memory) instead of WISE-Merge. How WISE-Merge merges
            (``merge_style``) and TIES' ``ties_density`` are the method's settings (``editing.methods.WISE``), since
            the memory uses them between merges too.
        export_dir: at the end of ``fit``, save the model, tokenizer and side memories here
            (reload with :func:`editing.wise_export.load_edited`).
    """

    @check_arguments
    def __init__(
        self,
        save_freq: PositiveInt = 500,
        merge_freq: PositiveInt = 1000,
        retrieve: bool = False,
        export_dir: str | None = None,
    ) -> None:
        if merge_freq % save_freq:
            raise ValueError(f"merge_freq: must be a multiple of save_freq ({save_freq}), got {merge_freq}")
        self.save_freq, self.merge_freq, self.retrieve = save_freq, merge_freq, retrieve
        self.export_dir = export_dir
        self.merges = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(save_freq=self.save_freq, merge_freq=self.merge_freq, retrieve=self.retrieve)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        WISE.of(pl_module, type(self).__name__)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        method = WISE.of(pl_module, type(self).__name__)
        done = int(pl_module.edits_done)
        before = done - len(batch)
        if done // self.save_freq > before // self.save_freq:
            method.memory.save_shard()
        if done // self.merge_freq > before // self.merge_freq:
            method.memory.merge(self.retrieve)
            method.refresh_thresholds()
            self.merges += 1
            rank_zero_info(f"WiseMemory: merge {self.merges} after {done} edits")
        pl_module.log("wise/merges", float(self.merges), batch_size=len(batch))  # wise/memories: the method logs it

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is not None and trainer.is_global_zero:
            WISE.of(pl_module, type(self).__name__).export(self.export_dir)
            rank_zero_info(f"WiseMemory: exported the edited model to {self.export_dir}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"merges": self.merges}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.merges = state_dict.get("merges", 0)
