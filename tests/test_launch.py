"""Launch settings closed-form editing cannot honour are refused with one line naming the trainer argument, before
any process is launched, any model loaded or anything written."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_fit_args
from lightning.pytorch import Trainer

from editing.launch import check_launch
from main import cli_main


def test_single_process_float32_is_accepted() -> None:
    check_launch(Trainer(accelerator="cpu", devices=1, logger=False))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "ddp", "devices": 2}, r"trainer.strategy: DDPStrategy \(2 processes\) is not supported"),
        ({"precision": "bf16-mixed"}, "trainer.precision: 'bf16-mixed' cannot apply to closed-form editing"),
        ({"precision": "16-mixed"}, "trainer.precision: '(bf)?16-mixed' cannot apply"),  # bf16 on a CPU
        ({"precision": "bf16-true"}, "--model.dtype bfloat16"),
        ({"val_check_interval": 0}, "trainer.val_check_interval: 0 never evaluates"),
    ],
)
def test_unsupported_launch_is_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_launch(Trainer(accelerator="cpu", logger=False, **settings))


def test_the_command_refuses_ddp_before_loading_anything(tiny_run: dict[str, Path]) -> None:
    args = tiny_fit_args(tiny_run, "lyaplock", tiny_run["root"], "--trainer.strategy", "ddp", "--trainer.devices", "2")
    with pytest.raises(ValueError, match="trainer.strategy: DDPStrategy"):
        cli_main([*args, "--trainer.accelerator", "cpu"])
    assert not tiny_run["cache"].exists()  # no model converted, no C0 collected
