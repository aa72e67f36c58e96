"""``ConditionNumberMonitor``: the spectrum of every edited matrix over the edit stream (DESIGN.md section 7).

PRUNE (arXiv 2405.16821) traces the collapse of sequential editing to the condition number of the edited matrices:
the accumulated edit ``Delta_n = W_n - W`` grows singular values far beyond those of ``W``. This monitor logs, per
edited matrix and every ``every_n_steps`` edit steps, ``kappa(W_n) = sigma_max / sigma_min``, ``sigma_max``,
``sigma_min``, ``||W_n||_F``, ``||Delta_n||_2``, ``||Delta_n||_F`` and, with ``PruneRestraint`` attached, the number of
singular values of ``Delta_n`` at or above ``sigma_max(W)`` (the ones PRUNE restrains). It works with every method.
"""

from __future__ import annotations

from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from callbacks.original_weights import OriginalWeights
from callbacks.prune import PruneRestraint
from editing.arguments import check_arguments
from editing.spectral import spectral_stats


class ConditionNumberMonitor(OriginalWeights):
    """Logs the spectrum of every edited matrix as ``spectral/layer_NN/<stat>`` every ``every_n_steps`` edit steps.

    Stats (see :func:`spectral_stats`): ``kappa``, ``sigma_max``, ``sigma_min``, ``weight_fro``, ``delta_2``,
    ``delta_fro``, and ``restrained`` when a :class:`~callbacks.prune.PruneRestraint` is attached (whose snapshot of the
    original weights it then shares instead of keeping its own). The module logs ``edits/total`` at every step, so
    dashboards plot them against the number of edits; :class:`~callbacks.report.RunReport` puts the last values into
    ``summary.json``. The values are those of the weights editing continues from (unrestrained in PRUNE's ``posthoc``
    mode; in ``inloop`` mode list PRUNE first to see the restrained ones). With ``every_n_steps > 1`` Lightning
    repeats the last measured values at the steps in between (it keeps step values for the whole epoch), so curves
    are step functions between measurements.

    Args:
        every_n_steps: log after every this many edit steps (each log costs two SVDs per edited matrix).
        exact_max_dim: matrices whose smaller side is at most this use exact SVDs; larger ones the Gram-matrix
            eigenvalues (see :func:`singular_value_range`).
    """

    @check_arguments
    def __init__(self, every_n_steps: PositiveInt = 1, exact_max_dim: PositiveInt = 2048) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.exact_max_dim = exact_max_dim
        self.last: dict[str, float] = {}  # the last logged values, by key

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    @staticmethod
    def _prune(trainer: Trainer) -> PruneRestraint | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, PruneRestraint)), None)

    @torch.no_grad()
    def compute(self, pl_module: LightningModule, prune: PruneRestraint | None = None) -> dict[str, float]:
        """Every ``spectral/layer_NN/<stat>`` value of the current weights (without logging them)."""
        originals = prune.originals if prune is not None else self.originals
        counts = prune.count_restrained(pl_module) if prune is not None else {}
        values = {}
        for name, weight in pl_module.method.edited_weights().items():
            stats = spectral_stats(weight.parameter, originals[name], self.exact_max_dim)
            if name in counts:
                stats["restrained"] = float(counts[name])
            values.update({f"spectral/layer_{weight.layer:02d}/{k}": v for k, v in stats.items()})
        return values

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._prune(trainer) is None:
            self._ensure_originals(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # `edits/total`, the x axis of these curves, is logged by the module at every step (its one owner).
        prune = self._prune(trainer)
        has_originals = bool(prune.originals if prune is not None else self.originals)  # False: resumed without them
        if trainer.global_step % self.every_n_steps == 0 and has_originals:
            self.last = self.compute(pl_module, prune)
            pl_module.log_dict(self.last, batch_size=len(batch))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))
