"""Command line: ``python main.py fit|validate --config configs/lyaplock.yaml [--model.model_name ...]``.

Built on LightningCLI: the module, data module and trainer arguments come from their signatures and docstrings.
Without an explicit ``trainer.logger`` a run logs to CSV and to Weights & Biases (offline unless ``WANDB_MODE=online``)
under ``trainer.default_root_dir``, and :class:`callbacks.RunReport` writes ``summary.json`` there.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import wandb
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from callbacks import RunReport
from editing import EditDataModule, EditingModule
from editing.models import check_model_name


class SaveAndLogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` beside the run and sends the full parsed config (method included) to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.config.as_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class EditingCLI(LightningCLI):
    """LightningCLI with the project's default loggers and run report."""

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Bad input fails here, before loggers, caches or the model are touched.
        check_model_name(self.model.model_name)
        self.datamodule.setup("fit")
        config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        root = config.get("default_root_dir") or "runs/default"
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            config["logger"] = [
                CSVLogger(root, name="csv"),
                WandbLogger(
                    project="lifelong-editing", save_dir=root, offline=os.environ.get("WANDB_MODE") != "online"
                ),
            ]
        callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(cb, RunReport) for cb in callbacks):
            callbacks.append(RunReport())
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(cb, ModelCheckpoint) for cb in callbacks
        ):
            # after every edit step, so a long stream resumes where it stopped (only the latest is kept)
            callbacks.append(ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=1, save_last=True))
        config["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        return trainer


def cli_main(args: list[str] | None = None) -> EditingCLI:
    try:
        return EditingCLI(
            EditingModule,
            EditDataModule,
            seed_everything_default=0,
            trainer_defaults={
                "max_epochs": 1,
                "num_sanity_val_steps": 0,
                "enable_model_summary": False,
                "log_every_n_steps": 1,
            },
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    finally:
        # Close the W&B run so a second run in the same process (tests, notebooks) starts its own.
        if wandb.run is not None:
            wandb.finish()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Lightning warnings that do not apply to editing: the frozen LM is in eval mode on purpose, requests are moved to
    # the device by the module, and checkpoints are taken after the closed-form update, not before it.
    for message in (
        ".*does not have many workers.*",
        ".*module\\(s\\) in eval mode.*",
        ".*overridden `transfer_batch_to_device`.*",
        ".*ModelCheckpoint with manual optimization.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message)
    try:
        cli_main()
    except ValueError as err:  # bad input: one clear line, no traceback, nothing written half-way
        logging.getLogger(__name__).debug("bad input", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
