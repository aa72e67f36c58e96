"""``RunCheckpoint``: the run's one resume file, ``checkpoints/last.ckpt`` beside ``summary.json``."""

from __future__ import annotations

import os

from jsonargparse.typing import NonNegativeInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from editing.arguments import check_arguments


class RunCheckpoint(ModelCheckpoint):
    """The run's resume point: one file, ``<trainer.default_root_dir>/checkpoints/last.ckpt``, overwritten every
    ``every_n_train_steps`` edit steps; ``fit --ckpt_path .../last.ckpt`` continues the stream from there.

    One file, not one per step nor a top-k copy beside it: at 7B scale one LyapLock checkpoint holds gigabytes. A
    ``ModelCheckpoint`` added to ``trainer.callbacks`` (to keep every step, say) runs beside it; this class has its own
    ``state_key``, so the two do not collide in the checkpoint.

    Args:
        every_n_train_steps: edit steps between two saves (the last step of the stream is saved only when it falls on
            one); 0 writes no checkpoint.
    """

    @check_arguments
    def __init__(self, every_n_train_steps: NonNegativeInt = 1) -> None:
        super().__init__(
            every_n_train_steps=every_n_train_steps,
            save_top_k=0,
            save_last=every_n_train_steps > 0,
            enable_version_counter=False,  # overwrite the last.ckpt of an earlier run in the same directory
        )

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # beside summary.json, not under the first logger's version directory (ModelCheckpoint's default)
        self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning saves a step's checkpoint when the step ends, before that step's evaluation. Saved again after
        # it, the checkpoint holds the evaluation: a run resumed from it keeps that point (a long stream's milestone)
        # in its history, summary.json and curves instead of dropping it.
        saved_this_step = self._last_global_step_saved == trainer.global_step and self.last_model_path
        if saved_this_step and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
