"""``Editor``: sequential editing from Python (notebooks, scripts), on the command line's own parts.

An :class:`Editor` holds one :class:`~editing.module.EditingModule` (the model and one method's state) and runs a
fresh Lightning ``Trainer`` per call: ``edit`` is ``Trainer.fit`` over an :class:`~editing.data.EditDataModule` of the
given requests, ``evaluate`` is ``Trainer.validate``. Consecutive ``edit`` calls continue one sequential stream: the
module's ``edits_done`` and the method's state (LyapLock's queue and replay sums, AlphaEdit's past keys, WISE's
memories) persist between them, and each call's data module holds every request edited so far followed by the new
ones, of which it edits only the new ones. Locality is measured against the model as it was before the call that
edited a request (for the first call: the unedited model).

Example (the embedded SmolLM2-135M-Instruct with the LyapLock preset of ``configs/lyaplock.yaml``)::

    editor = Editor("lyaplock")
    editor.edit({"case_id": "1", "prompt": "The capital of {} is", "subject": "France", "target_new": "Madrid"})
    editor.evaluate()  # {"val/efficacy": ..., "val/locality": ..., ...}
    ids = editor.tokenizer("The capital of France is", return_tensors="pt")
    editor.tokenizer.decode(editor.model.generate(**ids, max_new_tokens=5)[0])
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from editing.data import EditDataModule
from editing.export import export_model
from editing.methods.base import EditMethod, build_method
from editing.models import EMBEDDED_MODEL
from editing.module import EditingModule
from editing.requests import EditRequest, RequestError, as_requests

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The shipped method configs: ``Editor(method=NAME)`` reads ``CONFIG_DIR / f"{NAME}.yaml"``."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 1,  # one pass over the stream: every request is edited once
    "num_sanity_val_steps": 0,  # a sanity evaluation would score the stream before the reference is cached
    "enable_model_summary": False,
    "log_every_n_steps": 1,  # one step is one edit batch: every one is worth a row
}
"""Trainer settings of every run, the command line's (``main.trainer_defaults``) and the Editor's."""

Requests = EditRequest | dict[str, Any] | Iterable[EditRequest | dict[str, Any]]


def default_loggers() -> list[dict[str, Any]]:
    """The run's loggers as ``class_path`` + ``init_args``: CSV, and Weights & Biases offline unless
    ``WANDB_MODE=online`` (``save_dir`` is the run directory, set by the caller)."""
    return [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "csv"}},
        {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "lifelong-editing", "offline": os.environ.get("WANDB_MODE") != "online"},
        },
    ]


def method_names() -> list[str]:
    """The method names ``Editor`` accepts: the stems of the shipped configs (``lyaplock``, ``memit_prune``, ...)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


class Editor:
    """One model under sequential editing by one method, from Python.

    Args:
        method: a shipped config's name (:func:`method_names`: ``lyaplock``, ``memit``, ``alphaedit``, ``ft``,
            ``wise``, ``memit_prune``, ...), the path of a config file, or an :class:`EditMethod`. A name takes the
            config's ``model.method`` with its SmolLM2 preset values when ``model`` is the embedded default, and the
            signature's defaults (the papers') for any other model; a path takes its values as they are. Both add
            the config's ``trainer.callbacks`` (PRUNE, WISE's memory schedule).
        model: ``SmolLM2-135M-Instruct`` (embedded, offline), a local directory or Hugging Face id, or a
            ``(PreTrainedModel, tokenizer)`` pair already in memory, which is edited in place.
        dtype: parameter dtype of a model loaded by name.
        cache_dir: converted models and C0 statistics (default ``$EDITING_CACHE`` or ``~/.cache/lifelong-editing``).
        metric_family: how requests are scored (``auto``, ``counterfact``, ``token``; see ``EditDataModule``).
        callbacks: more Lightning callbacks for every call (after the config's).
        logger: ``False`` (none), ``True`` (the command line's: CSV and offline W&B under ``root_dir``), or Lightning
            loggers, kept for every call (W&B's run stays open until ``wandb.finish()``; its charts plot against
            ``edits/total``, which counts on across calls).
        checkpoint_every_n_steps: 0 writes no checkpoint; N writes ``root_dir/checkpoints/last.ckpt`` every N edit
            steps of an ``edit`` call (``EditingModule.load_from_checkpoint`` reloads it).
        root_dir: where logs and checkpoints go, when asked for.
        progress_bar: show the progress bar (:class:`callbacks.EditProgressBar`: edits done, edits/min, time left).
        accelerator: Lightning's accelerator (``auto``: a GPU when there is one; one device).
        **method_overrides: constructor arguments of the method that replace the config's (``mom2_weight=100``,
            ``layers=[4, 5]``), checked as the command line checks them.
    """

    def __init__(
        self,
        method: str | Path | EditMethod = "lyaplock",
        model: str | tuple[PreTrainedModel, PreTrainedTokenizerBase] = EMBEDDED_MODEL,
        *,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        cache_dir: str | None = None,
        metric_family: Literal["auto", "counterfact", "token"] = "auto",
        callbacks: Sequence[Callback] = (),
        logger: bool | Logger | Sequence[Logger] = False,
        checkpoint_every_n_steps: int = 0,
        root_dir: str | Path = "runs/editor",
        progress_bar: bool = True,
        accelerator: str = "auto",
        **method_overrides: Any,
    ) -> None:
        edit_method, config_callbacks = resolve_method(method, model == EMBEDDED_MODEL, method_overrides)
        if isinstance(model, tuple):
            if len(model) != 2 or not isinstance(model[0], PreTrainedModel):
                raise TypeError("model: expected a model name or path, or a (PreTrainedModel, tokenizer) pair")
            self.module = EditingModule.from_model(model[0], model[1], edit_method, cache_dir=cache_dir)
        elif isinstance(model, str | Path):
            self.module = EditingModule(edit_method, model_name=str(model), dtype=dtype, cache_dir=cache_dir)
        else:
            raise TypeError(f"model: expected a model name or path, or a (model, tokenizer) pair, got {type(model)}")
        if checkpoint_every_n_steps < 0:
            raise ValueError(f"checkpoint_every_n_steps: expected 0 or more, got {checkpoint_every_n_steps}")
        self.metric_family = metric_family
        self.callbacks = [*config_callbacks, *callbacks]
        self.root_dir = Path(root_dir)
        self.loggers = _loggers(logger, self.root_dir)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.progress_bar = progress_bar
        self.accelerator = accelerator
        self.edited: list[EditRequest] = []  # the stream so far, in the order it was edited
        self.edit_steps = 0  # edit steps of all calls (what step-based callback policies read at export)
        self.module.configure_model()  # load and bind now: a bad model or method fails here, and .model is ready

    @property
    def model(self) -> PreTrainedModel:
        """The edited language model (``generate()`` works; WISE routes through its side memory)."""
        return self.module.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Its tokenizer (right padding, which batched ``generate()`` calls may want to switch to left)."""
        return self.module.tokenizer

    @property
    def method(self) -> EditMethod:
        """The editing method and its state."""
        return self.module.method

    def edit(self, requests: Requests, edits_per_step: int = 1, evaluate: bool = False) -> dict[str, float]:
        """Edit ``requests`` (one or a list of :class:`EditRequest` or canonical dicts) after those of earlier calls.

        Args:
            requests: the new requests; their ``case_id`` must differ from every request edited before.
            edits_per_step: requests edited together in one step (one ``Trainer`` step).
            evaluate: after the last step, score every request edited so far (``val/*``), as the command line does.

        Returns:
            The values logged by the last step (``train/*``, ``time/*``, ``edits/total``) and, with ``evaluate``, by
            the evaluation.
        """
        new = _fresh(as_requests(requests), self.edited)
        stream = [*self.edited, *new]
        data = EditDataModule.from_requests(
            stream, edits_per_step, start=len(self.edited), metric_family=self.metric_family
        )
        self.module.stream = data.stream()
        trainer = self._trainer(fit=True, limit_val_batches=None if evaluate else 0)
        try:
            trainer.fit(self.module, datamodule=data)
        finally:  # an interrupted call keeps what it edited: the next call continues after it
            self.edited = stream[: int(self.module.edits_done)]
            self.edit_steps += trainer.global_step
        return {key: float(value) for key, value in trainer.callback_metrics.items()}

    def evaluate(self, requests: Requests | None = None) -> dict[str, float]:
        """Score requests with ``Trainer.validate``: ``None`` scores every request edited so far; given requests are
        all scored, edited or not (an unedited one's locality is measured against the current model).

        Returns:
            The metrics, keyed as the loggers key them (``val/efficacy``, ``val/generalization``, ``val/locality``,
            ``val/specificity`` and ``val/fluency`` where the requests have the probes, ``edits/total``).
        """
        if requests is None:
            if not self.edited:
                raise ValueError("requests: nothing is edited yet; pass the requests to score")
            data = EditDataModule.from_requests(self.edited, metric_family=self.metric_family)
        else:
            data = EditDataModule.from_requests(as_requests(requests), scored="all", metric_family=self.metric_family)
        self.module.stream = data.stream()
        edited = {r.case_id for r in self.edited}
        try:
            (metrics,) = self._trainer(fit=False).validate(self.module, datamodule=data, verbose=False)
        finally:
            # A reference taken here for an unedited request is the current model's; the edit call that edits the
            # request takes its own, from the model as it is then.
            for case_id in [c for c in self.module.locality_reference if c not in edited]:
                del self.module.locality_reference[case_id]
        return {key: float(value) for key, value in metrics.items()}

    def export(self, path: str | Path) -> Path:
        """Write the edited model as a Hugging Face directory (:func:`editing.export.export_model`): plain
        ``AutoModelForCausalLM.from_pretrained(path)`` loads it, with PRUNE's restrained weights when the config has
        ``PruneRestraint``; a WISE export reloads with ``editing.wise_export.load_edited``."""
        return export_model(self.module, path, self.callbacks, self.edit_steps)

    def _trainer(self, fit: bool, **overrides: Any) -> Trainer:
        from callbacks.progress import EditProgressBar  # the callbacks package imports this one

        callbacks = list(self.callbacks)
        if self.progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(EditProgressBar())  # the command line's bar: edits done, edits/min, time left, scores
        if fit and self.checkpoint_every_n_steps:
            # As the command line's callbacks.RunCheckpoint: one last.ckpt, overwritten. A fresh one per call, since
            # each call's Trainer counts its steps from 0.
            callbacks.append(
                ModelCheckpoint(
                    dirpath=self.root_dir / "checkpoints",
                    every_n_train_steps=self.checkpoint_every_n_steps,
                    save_top_k=0,
                    save_last=True,
                    enable_version_counter=False,
                )
            )
        return Trainer(
            **TRAINER_DEFAULTS,
            default_root_dir=str(self.root_dir),
            logger=self.loggers or False,
            callbacks=callbacks,
            enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
            enable_progress_bar=self.progress_bar,
            accelerator=self.accelerator,
            devices=1,
            # no_grad, not inference mode: tensors that one call's evaluation creates (metric states) are updated in
            # place by the next call, which inference tensors refuse
            inference_mode=False,
            **overrides,
        )


def resolve_method(
    method: str | Path | EditMethod, preset: bool, overrides: dict[str, Any]
) -> tuple[EditMethod, list[Callback]]:
    """The method and the config's callbacks for :class:`Editor`'s ``method`` argument (see there); ``preset``: use
    a named config's ``init_args`` (the SmolLM2 preset)."""
    if isinstance(method, EditMethod):
        if overrides:
            raise TypeError(f"{', '.join(overrides)}: method overrides apply to a method given by name or config file")
        return method, []
    path = Path(method)
    named = path.suffix not in (".yaml", ".yml")
    if named:
        path = CONFIG_DIR / f"{str(method).lower()}.yaml"
        if not path.is_file():
            raise ValueError(
                f"method: unknown method '{method}'; expected one of {', '.join(method_names())}, a config file or an "
                "EditMethod"
            )
    elif not path.is_file():
        raise ValueError(f"method: config file '{method}' does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    spec = (config.get("model") or {}).get("method")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"method: {path} has no model.method.class_path")
    init_args = dict(spec.get("init_args") or {}) if preset or not named else {}
    edit_method = build_method(
        {"class_path": spec["class_path"], "init_args": {**init_args, **overrides}}, allow_import=True
    )
    return edit_method, _callbacks((config.get("trainer") or {}).get("callbacks") or [])


def _callbacks(specs: list[dict[str, Any]]) -> list[Callback]:
    """Callbacks from a config's ``trainer.callbacks`` (``class_path`` + ``init_args``), checked as the CLI does."""
    if not specs:
        return []
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_object({"callbacks": specs})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # jsonargparse < 4.49
    return list(instantiate(config).callbacks)


def _loggers(logger: bool | Logger | Sequence[Logger], root: Path) -> list[Logger]:
    if logger is False:
        return []
    if logger is True:
        out = []
        for spec in default_loggers():
            module_name, _, name = spec["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module_name), name)
            out.append(cls(save_dir=str(root), **spec["init_args"]))
        return out
    return [logger] if isinstance(logger, Logger) else list(logger)


def _fresh(requests: list[EditRequest], edited: list[EditRequest]) -> list[EditRequest]:
    """``requests``, refused when empty or when a case id repeats one of the stream (locality references are keyed by
    it)."""
    if not requests:
        raise RequestError("requests: no requests to edit")
    seen = {r.case_id for r in edited}
    for i, request in enumerate(requests):
        if request.case_id in seen:
            raise RequestError(
                f"requests: record {i} (case_id {request.case_id}): this case_id is already in the stream; give every "
                "request its own case_id"
            )
        seen.add(request.case_id)
    return requests
