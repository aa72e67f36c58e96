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
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from callbacks.prune import PruneRestraint, _OriginalWeights


def singular_value_range(M: torch.Tensor, exact_max_dim: int = 2048) -> tuple[float, float]:
    """``(sigma_max, sigma_min)`` of ``M`` in float64.

    When the smaller side of ``M`` is at most ``exact_max_dim`` (SmolLM2-135M: 576, GPT-2 XL: 1600), both come from
    ``torch.linalg.svdvals`` (exact). Larger matrices (Llama-7B's 4096 x 11008) use the eigenvalues of the Gram matrix
    of the smaller side, ``M M^T`` (one matmul and one symmetric eigensolve: several times cheaper than an SVD), whose
    square roots are the singular values: ``sigma_max`` to machine precision, ``sigma_min`` to a relative error of
    about ``1e-16 kappa^2``, ample below ``kappa ~ 1e6``.
    """
    M = M.double()
    if min(M.shape) <= exact_max_dim:
        s = torch.linalg.svdvals(M)
        return float(s[0]), float(s[-1])
    gram = M @ M.mT if M.shape[0] <= M.shape[1] else M.mT @ M
    e = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()  # ascending
    return float(e[-1]), float(e[0])


def spectral_stats(current: torch.Tensor, original: torch.Tensor, exact_max_dim: int = 2048) -> dict[str, float]:
    """Spectral statistics of an edited matrix ``W_n = current`` and of its edit ``Delta_n = W_n - W``.

    Returns:
        ``kappa``, ``sigma_max``, ``sigma_min``, ``weight_fro`` (``||W_n||_F``), ``delta_2`` (``||Delta_n||_2``),
        ``delta_fro`` (``||Delta_n||_F``); ``kappa`` is ``inf`` for a singular matrix.
    """
    W = current.double()
    delta = W - original.double()
    s_max, s_min = singular_value_range(W, exact_max_dim)
    d_max, _ = singular_value_range(delta, exact_max_dim) if delta.any() else (0.0, 0.0)
    return {
        "kappa": s_max / s_min if s_min > 0 else float("inf"),
        "sigma_max": s_max,
        "sigma_min": s_min,
        "weight_fro": float(torch.linalg.matrix_norm(W)),
        "delta_2": d_max,
        "delta_fro": float(torch.linalg.matrix_norm(delta)),
    }


class ConditionNumberMonitor(_OriginalWeights):
    """Logs the spectrum of every edited matrix as ``spectral/layer_NN/<stat>`` every ``every_n_steps`` edit steps.

    Stats (see :func:`spectral_stats`): ``kappa``, ``sigma_max``, ``sigma_min``, ``weight_fro``, ``delta_2``,
    ``delta_fro``, and ``restrained`` when a :class:`~callbacks.prune.PruneRestraint` is attached (whose snapshot of the
    original weights it then shares instead of keeping its own). ``edits/total`` is logged with them, so dashboards
    plot them against the number of edits; :class:`~callbacks.report.RunReport` puts the last values into
    ``summary.json``. The values are those of the weights editing continues from (unrestrained in PRUNE's ``posthoc``
    mode; in ``inloop`` mode list PRUNE first to see the restrained ones). With ``every_n_steps > 1`` Lightning
    repeats the last measured values at the steps in between (it keeps step values for the whole epoch), so curves
    are step functions between measurements.

    Args:
        every_n_steps: log after every this many edit steps (each log costs two SVDs per edited matrix).
        exact_max_dim: matrices whose smaller side is at most this use exact SVDs; larger ones the Gram-matrix
            eigenvalues (see :func:`singular_value_range`).
    """

    def __init__(self, every_n_steps: int = 1, exact_max_dim: int = 2048) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps: must be >= 1, got {every_n_steps}")
        if exact_max_dim < 1:
            raise ValueError(f"exact_max_dim: must be >= 1, got {exact_max_dim}")
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
        # `edits/total` goes out at every step: Lightning keeps re-sending a step value logged from this hook at the
        # following steps of the epoch until it is logged again, so a periodic `edits/total` would go stale.
        values = {"edits/total": float(pl_module.edits_done)}
        prune = self._prune(trainer)
        has_originals = bool(prune.originals if prune is not None else self.originals)  # False: resumed without them
        if trainer.global_step % self.every_n_steps == 0 and has_originals:
            self.last = self.compute(pl_module, prune)
            values.update(self.last)
        pl_module.log_dict(values, batch_size=len(batch))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = dict(state_dict.get("last", {}))
