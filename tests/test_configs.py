"""Every shipped config parses and builds its run against the CLI, and the run defaults are configuration.

As litgpt's ``tests/test_config_hub.py``: the CLI is built with running mocked out, so a renamed argument in a
signature or a config breaks CI, not users. Nothing here loads a model or writes a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks import (
    ConditionNumberMonitor,
    EditProgressBar,
    HeldOutPerplexity,
    PruneRestraint,
    RunCheckpoint,
    RunReport,
)
from editing.methods import EditMethod
from editing.models import default_mlp_layers
from main import EditingCLI, cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``cli_main(args)`` up to a built trainer, without running the subcommand; runs in an empty directory that must
    stay empty (no run directory, log or checkpoint before a run starts)."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("WANDB_MODE", raising=False)

    def run(*args: str) -> EditingCLI:
        # an existing local path stands in for the embedded model, whose package these fast tests do not need
        with mock.patch.object(LightningCLI, "_run_subcommand"):
            cli = cli_main([*args, "--model.model_name", str(tmp_path)])
        assert not any(workdir.iterdir())
        return cli

    return run


def _callbacks(cli: EditingCLI) -> list[type]:
    return [type(cb) for cb in cli.trainer.callbacks]


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_builds_its_run(build, config: Path, subcommand: str) -> None:
    cli = build(subcommand, "--config", str(config))
    assert isinstance(cli.model.method, EditMethod)
    assert cli.trainer.default_root_dir == f"runs/{config.stem}"
    assert [type(logger) for logger in cli.trainer.loggers] == [CSVLogger, WandbLogger]
    assert {logger.save_dir for logger in cli.trainer.loggers} == {f"runs/{config.stem}"}
    assert _callbacks(cli).count(RunReport) == 1 and _callbacks(cli).count(RunCheckpoint) == 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_prints(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: editing.methods." in capsys.readouterr().out


def test_run_defaults_are_configuration(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs" / "memit.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    for line in (
        "class_path: lightning.pytorch.loggers.CSVLogger",
        "class_path: lightning.pytorch.loggers.WandbLogger",
        "project: lifelong-editing",
        "offline: true",
        "report:\n  filename: summary.json",
        "checkpoint:\n  every_n_train_steps: 1",
    ):
        assert line in printed


def test_loggers_follow_the_run_directory(build, tmp_path: Path) -> None:
    root = str(tmp_path / "elsewhere")
    cli = build("fit", "--config", str(REPO / "configs" / "lyaplock.yaml"), "--trainer.default_root_dir", root)
    assert [logger.save_dir for logger in cli.trainer.loggers] == [root, root]
    assert cli.trainer.loggers[0].log_dir.startswith(os.path.join(root, "csv"))


def test_wandb_syncs_only_when_asked(build, monkeypatch: pytest.MonkeyPatch) -> None:
    lyaplock = str(REPO / "configs" / "lyaplock.yaml")
    assert cli_offline(build("fit", "--config", lyaplock))
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not cli_offline(build("fit", "--config", lyaplock))
    monkeypatch.delenv("WANDB_MODE")
    assert not cli_offline(build("fit", "--config", lyaplock, "--trainer.logger.init_args.offline", "false"))


def cli_offline(cli: EditingCLI) -> bool:
    (wandb,) = [logger for logger in cli.config.fit.trainer.logger if logger.class_path.endswith("WandbLogger")]
    return wandb.init_args.offline


def test_user_logger_replaces_the_defaults(build, tmp_path: Path) -> None:
    lyaplock = str(REPO / "configs" / "lyaplock.yaml")
    cli = build("fit", "--config", lyaplock, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger")
    assert [(type(logger), logger.save_dir) for logger in cli.trainer.loggers] == [(CSVLogger, "runs/lyaplock")]
    assert build("fit", "--config", lyaplock, "--trainer.logger", "false").trainer.loggers == []


def test_configured_callbacks_keep_the_report_and_the_checkpoint(build) -> None:
    config = str(REPO / "configs" / "memit_prune.yaml")
    cli = build("fit", "--config", config, "--trainer.callbacks+=callbacks.HeldOutPerplexity")
    callbacks = _callbacks(cli)
    assert callbacks.index(PruneRestraint) < callbacks.index(ConditionNumberMonitor) < callbacks.index(RunReport)
    assert HeldOutPerplexity in callbacks and RunCheckpoint in callbacks


def test_the_edit_progress_bar_is_the_default_and_gives_way(build, tmp_path: Path) -> None:
    lyaplock = str(REPO / "configs" / "lyaplock.yaml")
    bars = [cb for cb in build("fit", "--config", lyaplock).trainer.callbacks if isinstance(cb, TQDMProgressBar)]
    assert [type(bar) for bar in bars] == [EditProgressBar]
    cli = build("fit", "--config", lyaplock, "--progress_bar.refresh_rate", "5")
    assert next(cb for cb in cli.trainer.callbacks if isinstance(cb, EditProgressBar)).refresh_rate == 5
    cli = build("fit", "--config", lyaplock, "--trainer.enable_progress_bar", "false")
    assert not any(isinstance(cb, TQDMProgressBar) for cb in cli.trainer.callbacks)
    cli = build("fit", "--config", lyaplock, "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, TQDMProgressBar)] == [TQDMProgressBar]


def test_checkpoint_interval_is_configurable(build) -> None:
    lyaplock = str(REPO / "configs" / "lyaplock.yaml")
    cli = build("fit", "--config", lyaplock, "--checkpoint.every_n_train_steps", "5")
    checkpoint = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunCheckpoint))
    assert checkpoint._every_n_train_steps == 5 and checkpoint.save_last and checkpoint.save_top_k == 0
    cli = build("fit", "--config", lyaplock, "--checkpoint.every_n_train_steps", "0")
    assert not next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunCheckpoint)).save_last


def test_the_module_receives_the_stream_of_the_data_module(build) -> None:
    cli = build("validate", "--config", str(REPO / "configs" / "memit.yaml"), "--data.limit", "5")
    assert cli.model.stream is cli.datamodule.stream() and len(cli.model.stream.requests) == 5
    assert "stream" not in cli.model.hparams  # a live object, not a hyperparameter
    assert "stream" not in cli.config.validate.model


def test_smollm2_edits_its_preset_blocks_by_default() -> None:
    """The shipped configs leave ``layers`` to the model: blocks 3-7 of SmolLM2-135M's 30 (its shape, on meta)."""
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert default_mlp_layers(model) == [3, 4, 5, 6, 7]
    config.num_hidden_layers = 32  # another depth: the 15-30% rule
    with torch.device("meta"):
        assert default_mlp_layers(LlamaForCausalLM(config)) == [4, 5, 6, 7, 8]
