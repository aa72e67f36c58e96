"""Launch settings closed-form editing cannot honour are refused with one line naming the trainer argument, before
any process is launched, any model loaded or anything written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_fit_args
from lightning.pytorch import Trainer

from editing import EditDataModule, EditingModule
from editing.launch import EditingDDPStrategy, check_launch
from main import EditingCLI, EditingTrainer, cli_main, trainer_defaults


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


def test_the_command_refuses_a_mixed_precision_before_loading_anything(tiny_run: dict[str, Path]) -> None:
    args = tiny_fit_args(tiny_run, "lyaplock", tiny_run["root"], "--trainer.precision", "bf16-mixed")
    with pytest.raises(ValueError, match="trainer.precision: 'bf16-mixed'"):
        cli_main([*args, "--trainer.accelerator", "cpu"])
    assert not tiny_run["cache"].exists()  # no model converted, no C0 collected


def test_more_devices_than_the_machine_has_is_one_line(tiny_run: dict[str, Path]) -> None:
    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    args = tiny_fit_args(tiny_run, "memit", tiny_run["root"], "--trainer.accelerator", "gpu", "--trainer.devices", "64")
    with pytest.raises(ValueError, match="trainer.accelerator/devices/strategy: "):
        cli_main(args)
    assert not tiny_run["cache"].exists()


def test_editing_ddp_is_accepted_and_the_command_maps_ddp_to_it(tiny_run: dict[str, Path]) -> None:
    check_launch(Trainer(accelerator="cpu", devices=2, strategy="ddp_editing", logger=False))
    args = tiny_fit_args(tiny_run, "memit", tiny_run["root"], "--trainer.strategy", "ddp", "--trainer.devices", "2")
    cli = EditingCLI(  # parsed and instantiated, not run: no process is launched
        EditingModule,
        EditDataModule,
        trainer_defaults=trainer_defaults(),
        trainer_class=EditingTrainer,
        args=[*args[1:], "--trainer.accelerator", "cpu"],
        run=False,
    )
    assert isinstance(cli.trainer.strategy, EditingDDPStrategy) and cli.trainer.world_size == 2
