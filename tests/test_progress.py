"""The command line's progress bar: edits done, edits per minute, time left and the latest scores."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import torch

from callbacks import EditProgressBar


def test_the_bar_shows_edits_rate_time_left_and_scores() -> None:
    bar = EditProgressBar()
    module = SimpleNamespace(edits_done=torch.tensor(0), _stream=SimpleNamespace(requests=[None] * 100))
    trainer = SimpleNamespace(
        loggers=[],
        progress_bar_metrics={},
        callback_metrics={"val/efficacy": torch.tensor(0.96875), "val/locality": torch.tensor(0.5), "val/scored_edits":
                          torch.tensor(30.0), "train/efficacy": torch.tensor(1.0)},
    )  # fmt: skip
    with mock.patch("callbacks.progress.time.monotonic", return_value=100.0):
        bar._started, bar._edits_at_start = 100.0, 0  # as on_train_start sets them
        assert bar.get_metrics(trainer, module) == {"edits": "0/100", "eff": "0.969", "loc": "0.5"}
    module.edits_done = torch.tensor(30)
    with mock.patch("callbacks.progress.time.monotonic", return_value=160.0):  # 30 edits of 100 after 60 s
        items = bar.get_metrics(trainer, module)
    assert items == {"edits": "30/100", "edits/min": "30", "eta": "0:02:20", "eff": "0.969", "loc": "0.5"}


def test_a_resumed_run_counts_the_rate_of_its_own_edits() -> None:
    bar = EditProgressBar()
    module = SimpleNamespace(edits_done=torch.tensor(40), _stream=SimpleNamespace(requests=[None] * 100))
    trainer = SimpleNamespace(loggers=[], progress_bar_metrics={}, callback_metrics={})
    with mock.patch("callbacks.progress.time.monotonic", return_value=0.0):
        with mock.patch("lightning.pytorch.callbacks.TQDMProgressBar.on_train_start"):
            bar.on_train_start(trainer, module)
    module.edits_done = torch.tensor(50)
    with mock.patch("callbacks.progress.time.monotonic", return_value=30.0):  # 10 edits in 30 s, 50 left
        assert bar.get_metrics(trainer, module) == {"edits": "50/100", "edits/min": "20", "eta": "0:02:30"}
