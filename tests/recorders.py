"""Callbacks that record what other callbacks leave behind, for tests that run whole Trainers."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class WeightsAtEvaluation(Callback):
    """Keeps a copy of every edited weight as it is at ``on_validation_epoch_end``, one dict per evaluation."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        edited = pl_module.method.edited_weights()
        self.seen.append({name: w.parameter.detach().clone() for name, w in edited.items()})
