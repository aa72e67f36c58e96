"""``RunReport`` records each evaluation with exactly the scores that evaluation logged."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from callbacks import RunReport


class _Stream(LightningModule):
    """One edit per training step; the first evaluation logs a score (``specificity``) that the later ones lack, as
    a stream whose later sample has no neighbourhood records would."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.edits_done = 0
        self.model_name = "none"
        self.token_averaging = "case"
        self.stream = SimpleNamespace(source="x", stream_id="x", edits_per_step=1, metric_family="counterfact")
        self.method = SimpleNamespace(timings={"solve": 0.0}, step_log=dict)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.edits_done += 1
        return self.layer(batch).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/efficacy", float(self.edits_done))
        if self.edits_done == 1:
            self.log("val/specificity", 0.5)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(3, 1))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(1, 1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_an_evaluation_records_only_the_scores_it_logged(tmp_path: Path) -> None:
    report = RunReport()
    trainer = Trainer(
        max_steps=3, val_check_interval=1, num_sanity_val_steps=0, callbacks=[report], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(_Stream())
    assert [e["metrics"] for e in report.evaluations] == [
        {"efficacy": 1.0, "specificity": 0.5},
        {"efficacy": 2.0},
        {"efficacy": 3.0},
    ]
    assert (tmp_path / "summary.json").is_file()
