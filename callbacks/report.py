"""``RunReport``: writes ``summary.json`` (method, model, protocol, metrics, timing) into the run directory, and its
protocol and final metrics into the summary of every W&B run."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from callbacks.general_ability import GeneralAbility
from callbacks.perplexity import HeldOutPerplexity

log = logging.getLogger(__name__)
_EVALUATORS = (GeneralAbility, HeldOutPerplexity)


class RunReport(Callback):
    """Collects per-step timings and every evaluation, and writes them to ``<default_root_dir>/summary.json``.

    The summary records the protocol next to the numbers (the stream, edits per step, edits applied, when evaluation
    ran, with which metric family and how token accuracies were averaged), so results from different runs can be
    compared honestly. Every ``WandbLogger``'s run summary gets the same fields, flattened (:func:`summary_fields`).

    Args:
        filename: name of the summary file inside ``trainer.default_root_dir``.
    """

    def __init__(self, filename: str = "summary.json") -> None:
        self.filename = filename
        self.step_times: list[dict[str, float]] = []
        self.evaluations: list[dict[str, Any]] = []
        self._eval_started = 0.0

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_times.append({**pl_module.method.timings, **pl_module.method.step_log()})

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_started = time.perf_counter()
        # ``callback_metrics`` keeps every key ever logged: drop the earlier evaluations' scores, so that this
        # evaluation's record holds only what it measured (a score it lacks must not repeat an older value).
        for key in [key for key in trainer.callback_metrics if key.startswith("val/")]:
            del trainer.callback_metrics[key]

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Read once every epoch-end hook has logged (the module logs its scores after the callbacks' hooks), and
        # written after every evaluation, so a long run cut short still leaves its curves.
        if trainer.sanity_checking:
            return
        metrics = {
            key.removeprefix("val/"): float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("val/")
        }
        seconds = time.perf_counter() - self._eval_started
        self.evaluations.append({"edits": int(pl_module.edits_done), "metrics": metrics, "seconds": seconds})
        self.write(trainer, pl_module)

    def summary(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        stream = pl_module.stream
        steps = len(self.step_times)
        split = (
            {k: sum(t.get(k, 0.0) for t in self.step_times) / steps for k in pl_module.method.timings} if steps else {}
        )
        val_interval = trainer.val_check_interval
        return {
            "method": type(pl_module.method).__name__,
            "model": pl_module.model_name,
            "protocol": {
                "data": stream.source,
                "stream_id": stream.stream_id,
                "edits_per_step": stream.edits_per_step,
                "total_edits": int(pl_module.edits_done),
                "edit_steps": steps,
                "metric_family": stream.metric_family,
                "token_averaging": pl_module.token_averaging,
                "evaluation": "after the last edit"
                if isinstance(val_interval, float) and val_interval == 1.0  # the int 1 means every step
                else f"every {val_interval} steps and at the end",
            },
            "metrics": self.evaluations[-1]["metrics"] if self.evaluations else {},
            # the last values of ConditionNumberMonitor and RoutingMonitor, when attached
            **{section: _section(trainer, section) for section in ("spectral", "routing")},
            "history": self.evaluations,
            # the histories of evaluating callbacks (held-out perplexity, general ability), including the point
            # measured before the first edit, which never reaches the logged metrics
            "curves": {type(cb).__name__: cb.history for cb in trainer.callbacks if isinstance(cb, _EVALUATORS)},
            "steps": self.step_times,
            "timing": {
                "seconds_per_step": sum(split.values()) if split else None,
                "split": split,
                "evaluation_seconds": self.evaluations[-1]["seconds"] if self.evaluations else None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            },
        }

    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = self.summary(trainer, pl_module)
        path.write_text(json.dumps(summary, indent=2))
        log.info("Wrote %s", path)
        fields = summary_fields(summary)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the run's summary in W&B: its table of runs can compare them
                for key, value in fields.items():
                    logger.experiment.summary[key] = value

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"step_times": self.step_times, "evaluations": self.evaluations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_times = state_dict.get("step_times", [])
        self.evaluations = state_dict.get("evaluations", [])


def summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """The W&B run summary fields of a ``summary.json``: method, model, the protocol and the last evaluation's metrics
    with flattened keys (``protocol/edits_per_step``, ``metrics/efficacy``), and the seconds per edit step.

    Example:
        >>> fields = summary_fields({"method": "MEMIT", "model": "m", "protocol": {"total_edits": 3},
        ...                          "metrics": {"efficacy": 1.0}, "timing": {"seconds_per_step": 2.5}})
        >>> fields["protocol/total_edits"], fields["metrics/efficacy"], fields["timing/seconds_per_step"]
        (3, 1.0, 2.5)
    """
    fields = {"method": summary["method"], "model": summary["model"]}
    for section in ("protocol", "metrics"):
        fields.update({f"{section}/{key}": value for key, value in summary[section].items()})
    fields["timing/seconds_per_step"] = summary["timing"]["seconds_per_step"]
    return fields


def _section(trainer: Trainer, section: str) -> dict[str, float]:
    """The last logged values whose keys start with ``section/``, without the prefix."""
    prefix = f"{section}/"
    return {k.removeprefix(prefix): float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
