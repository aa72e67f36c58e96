"""Command line: ``python main.py fit|validate --config configs/lyaplock.yaml [--model.model_name ...]``.

Built on LightningCLI: the module, data module and trainer arguments come from their signatures and docstrings.
The run defaults are configuration, shown by ``--print_config`` and overridable from YAML or the command line:
``trainer.logger`` logs to CSV and to Weights & Biases (offline unless ``WANDB_MODE=online``), every logger's
``save_dir`` follows ``trainer.default_root_dir``; ``report`` (:class:`callbacks.RunReport`) writes ``summary.json``
there and ``checkpoint`` (:class:`callbacks.RunCheckpoint`) keeps ``checkpoints/last.ckpt`` to resume from.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import NoReturn

import wandb
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from typing_extensions import override

from callbacks import RunCheckpoint, RunReport
from editing import EditDataModule, EditingModule
from editing.models import check_model_name


class SaveAndLogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` beside the run and sends the full parsed config (method included) to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # As config.yaml holds it: plain numbers and strings, not jsonargparse's types (PositiveInt, Path), so every
        # logger stores it as data (CSV's hparams.yaml loads with yaml.safe_load).
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config["config"] = [str(path) for path in self.config.get("config") or []]  # the files it was composed from
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class EditingArgumentParser(LightningArgumentParser):
    """The command-line parser, reporting a bad argument as every other bad input: the error, not the full usage."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parsing internally, expecting an exception
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"error: {message}\ntip: {prog} --help lists the accepted arguments\n")
        self.exit(2)


class EditingCLI(LightningCLI):
    """LightningCLI with the run report and the resume checkpoint, and the loggers writing under the run directory."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Own groups, not defaults of `trainer.callbacks`: a list in a config replaces that list as a whole, and
        # `trainer_defaults["callbacks"]` would be fixed instances that --print_config does not show. These are always
        # present and configurable (`--checkpoint.every_n_train_steps 5`), beside whatever `trainer.callbacks` holds.
        parser.add_lightning_class_args(RunReport, "report")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # Every logger that takes a save_dir (CSV, W&B, TensorBoard, ...) writes into the run directory; a save_dir
        # given is replaced. (--print_config shows the config before links apply: save_dir null.)
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")
        # The module receives the edit stream it edits and scores from the data module, once it is built: reading
        # the stream here makes bad requests fail while the classes are instantiated, before anything is written.
        parser.link_arguments("data", "model.stream", compute_fn=EditDataModule.stream, apply_on="instantiate")

    @override
    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Bad input fails before anything is written: the requests were read when the data module was instantiated
        # (the link above), the loggers and callbacks create no directory until the run starts, and the model, caches
        # and logs are not touched yet.
        check_model_name(self.model.model_name)
        return super().instantiate_trainer(**kwargs)


def trainer_defaults() -> dict:
    """The trainer settings of every run; the method configs set ``default_root_dir`` (``runs/<method>``)."""
    return {
        "default_root_dir": "runs/default",
        "max_epochs": 1,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "csv"}},
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "lifelong-editing", "offline": os.environ.get("WANDB_MODE") != "online"},
            },
        ],
    }


def cli_main(args: list[str] | None = None) -> EditingCLI:
    try:
        return EditingCLI(
            EditingModule,
            EditDataModule,
            seed_everything_default=0,
            trainer_defaults=trainer_defaults(),
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            parser_class=EditingArgumentParser,
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
