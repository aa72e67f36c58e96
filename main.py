"""Command line: ``python main.py fit|validate|export --config configs/lyaplock.yaml [--model.model_name ...]``.

``export --ckpt_path RUN/checkpoints/last.ckpt --export_dir DIR`` writes a run's edited model as a Hugging Face
directory (:mod:`editing.export`); the model and method come from the checkpoint, so ``--config`` is only needed for
callbacks that change what is exported (``PruneRestraint``).

Built on LightningCLI: the module, data module and trainer arguments come from their signatures and docstrings.
The run defaults are configuration, shown by ``--print_config`` and overridable from YAML or the command line:
``trainer.logger`` logs to CSV and to Weights & Biases (offline unless ``WANDB_MODE=online``), every logger's
``save_dir`` follows ``trainer.default_root_dir``; ``report`` (:class:`callbacks.RunReport`) writes ``summary.json``
there, ``checkpoint`` (:class:`callbacks.RunCheckpoint`) keeps ``checkpoints/last.ckpt`` to resume from and
``progress_bar`` (:class:`callbacks.EditProgressBar`) shows edits done, edits per minute, time left and the scores;
``eval_samples`` (:class:`callbacks.EvalSamples`) logs prompts, targets and predictions as a W&B table.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch
import wandb
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

import callbacks
from callbacks import EditProgressBar, EvalSamples, RunCheckpoint, RunReport
from editing import EditDataModule, EditingModule
from editing.api import TRAINER_DEFAULTS, default_loggers
from editing.arguments import plain_config
from editing.export import ExportTransform, export_model
from editing.launch import EditingDDPStrategy, check_launch
from editing.models import check_model_name


class SaveAndLogConfig(SaveConfigCallback):
    """Writes ``config.yaml`` beside the run and sends the full parsed config (method included) to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # As config.yaml holds it: plain numbers and strings, not jsonargparse's types (PositiveInt, Path), so every
        # logger stores it as data (CSV's hparams.yaml loads with yaml.safe_load).
        config = plain_config(self.parser, self.config)
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


class EditingTrainer(Trainer):
    """Lightning's Trainer with ``export``, the command line's third subcommand (LightningCLI runs a subcommand as
    the trainer method of that name)."""

    def export(
        self, model: EditingModule, datamodule: LightningDataModule | None = None, *, ckpt_path: str, export_dir: str
    ) -> Path:
        """Write a checkpoint's edited model as a Hugging Face directory (safetensors, config, tokenizer).

        Args:
            model: the module, built from the checkpoint's hyperparameters (model name, method) and the config.
            datamodule: not used: no stream is needed to export.
            ckpt_path: the run's checkpoint (``checkpoints/last.ckpt``).
            export_dir: the directory to write; ``AutoModelForCausalLM.from_pretrained(export_dir)`` loads it (WISE:
                ``editing.wise_export.load_edited``). Callbacks of the config that change the exported weights
                (``PruneRestraint``: the restrained ones) are restored from the checkpoint and applied.
        """
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        # As Lightning restores a run: the model is built first, then the module's and the callbacks' states.
        model.configure_model()
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        saved = checkpoint.get("callbacks", {})
        transforms = [cb for cb in self.callbacks if isinstance(cb, ExportTransform)]
        for callback in transforms:
            callback.on_load_checkpoint(self, model, checkpoint)
            if callback.state_key in saved:
                callback.load_state_dict(saved[callback.state_key])
        restored = {cb.state_key for cb in transforms}
        for key in saved:
            kind = getattr(callbacks, key.split("{")[0], None)
            if isinstance(kind, type) and issubclass(kind, ExportTransform) and key not in restored:
                rank_zero_warn(
                    f"export: the checkpoint holds {key} state but the config has no such callback; its weights are "
                    "exported without it (pass the run's --config)"
                )
        path = export_model(model, export_dir, transforms, int(checkpoint.get("global_step", 0)))
        rank_zero_info(f"Exported the edited model of {ckpt_path} to {path}")
        return path


class EditingCLI(LightningCLI):
    """LightningCLI with the run report and the resume checkpoint, the loggers writing under the run directory, and
    the ``export`` subcommand."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    @override
    def before_instantiate_classes(self) -> None:
        # `--trainer.strategy ddp` means editing's DDP: Lightning's would wrap the module for gradients it never has
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("trainer.strategy") == "ddp":
            config["trainer.strategy"] = EditingDDPStrategy.strategy_name

    def before_fit(self) -> None:
        """Refuse a strategy or precision closed-form editing cannot use before Lightning launches any process."""
        check_launch(self.trainer)

    before_validate = before_fit

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # `export` rebuilds the module from the checkpoint's hyperparameters, which LightningCLI applies after
        # parsing (`--ckpt_path`); the method is required while parsing, so it is taken from there first and
        # --config stays optional.
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and argv[:1] == ["export"]:
            ckpt_path = _option_value(argv, "--ckpt_path")
            if ckpt_path is not None and Path(ckpt_path).is_file():
                checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
                method = checkpoint.get("hyper_parameters", {}).get("method")
                if method is not None:
                    self._subcommand_parsers["export"].set_defaults({"model.method": method})
        super().parse_arguments(parser, args)

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI parses a checkpoint's hyperparameters over the run's config, so `validate --ckpt_path ...
        # --model.method.init_args.slack 0.5` would silently use the checkpoint's slack. `fit` and `validate` keep
        # what the run says and name every model setting that differs from the checkpoint's; `export` rebuilds the
        # module from the checkpoint, as Lightning does.
        if self.config.get("subcommand") == "export":
            super()._parse_ckpt_path()
            return
        own = self.config.clone()
        super()._parse_ckpt_path()
        from_checkpoint, self.config = self.config, own
        subcommand = own.get("subcommand")
        if subcommand is None:
            return
        ours = dict(own[subcommand]["model"].items())
        theirs = dict(from_checkpoint[subcommand]["model"].items())
        for key in sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)):
            rank_zero_warn(
                f"model.{key}: {ours.get(key)!r} in this run, {theirs.get(key)!r} in the checkpoint; "
                "this run's value is used"
            )

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Own groups, not defaults of `trainer.callbacks`: a list in a config replaces that list as a whole, and
        # `trainer_defaults["callbacks"]` would be fixed instances that --print_config does not show. These are always
        # present and configurable (`--checkpoint.every_n_train_steps 5`), beside whatever `trainer.callbacks` holds.
        parser.add_lightning_class_args(RunReport, "report")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EvalSamples, "eval_samples")  # a W&B table per evaluation, when W&B logs
        # The edit progress bar (edits done, edits/min, time left, latest scores); dropped again when the trainer's
        # progress bar is off or `trainer.callbacks` holds one (see `_instantiate_trainer`).
        parser.add_lightning_class_args(EditProgressBar, "progress_bar")
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
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # e.g. more devices than the machine has: one line, as bad input
            raise ValueError(f"trainer.accelerator/devices/strategy: {err}") from err

    @override
    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> Trainer:
        # Lightning refuses a progress bar callback with `enable_progress_bar=False`, and two progress bars: the
        # `progress_bar` group gives way to both, so `--trainer.enable_progress_bar false` still turns it off.
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar") is False or any(isinstance(cb, ProgressBar) for cb in configured):
            callbacks = [cb for cb in callbacks if not isinstance(cb, EditProgressBar)]
        return super()._instantiate_trainer(config, callbacks)


def _option_value(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in ``argv`` (``--name value`` or ``--name=value``), ``None`` when absent."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


def trainer_defaults() -> dict:
    """The trainer settings of every run; the method configs set ``default_root_dir`` (``runs/<method>``)."""
    return {"default_root_dir": "runs/default", **TRAINER_DEFAULTS, "logger": default_loggers()}


def cli_main(args: list[str] | None = None) -> EditingCLI:
    try:
        return EditingCLI(
            EditingModule,
            EditDataModule,
            seed_everything_default=0,
            trainer_defaults=trainer_defaults(),
            trainer_class=EditingTrainer,
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
        while isinstance(err.__cause__, ValueError):  # jsonargparse wraps errors raised while it links arguments
            err = err.__cause__
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
