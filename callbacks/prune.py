"""``PruneRestraint``: PRUNE's restraint on the condition number of edited matrices (Ma et al., 2024, arXiv 2405.16821).

Sequential edits accumulate a perturbation ``Delta_n = W_n - W`` of every edited matrix, against its original ``W``.
Its largest singular values grow past those of ``W`` and inflate the condition number, which is what breaks the
model's other knowledge. PRUNE bounds them: with ``Delta_n = U S V^T`` every singular value ``s >= sigma_max(W)`` is
replaced by ``F(s) = sigma_max(W) + log_b(s / sigma_max(W))`` (``b``: ``log_base``, the paper's alpha) and the
restrained matrix is ``W + U F(S) V^T``; it replaces ``W_n`` (DESIGN.md section 7). Only the top singular triplets
change, so a truncated SVD is enough.

The callback never changes how a method computes its update (STYLE.md section 2.4); it decides when weights are
restrained: before every evaluation and export (``posthoc``, the paper's protocol) or every k edit steps (``inloop``,
an extension that the paper did not evaluate).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from callbacks.original_weights import OriginalWeights
from editing.arguments import GreaterThanOne, check_arguments
from editing.export import export_model
from editing.spectral import LogBase, restrain, singular_triplets_above, spectral_norm

log = logging.getLogger(__name__)


class PruneRestraint(OriginalWeights):
    """PRUNE: restrain the large singular values of the accumulated edit ``W_n - W`` of every edited matrix.

    - ``posthoc`` (the paper's protocol): editing always continues from the unrestrained weights ``W_n``; the
      restrained ones are swapped in at ``on_validation_start`` and swapped out at ``on_validation_end``, the
      outermost validation hooks, so callbacks that evaluate in between see them whatever their order; they are also
      what ``export_dir`` writes. Checkpoints hold ``W_n``.
    - ``inloop`` (an extension the paper did not evaluate): every ``every_n_steps`` edit steps the restrained weights
      replace ``W_n`` and editing continues from them.

    Place it before ``ConditionNumberMonitor`` in ``trainer.callbacks`` so that, in ``inloop`` mode, the monitor sees
    the restrained weights of a step; the monitor then also logs ``spectral/layer_NN/restrained``.

    Args:
        mode: ``posthoc`` or ``inloop`` (see above).
        log_base: base of the logarithm in ``F`` (the paper's alpha): ``e`` (the paper's default), a number > 1 (the
            paper also uses 2, 1.5 and 1.2), or ``linear`` for ``F(s) = (s + sigma_max) / 2``.
        every_n_steps: in ``inloop`` mode, restrain after every this many edit steps.
        rank: initial rank of the truncated SVD of ``W_n - W`` (doubled until it reaches below the threshold).
        niter: power iterations of the randomized SVD (more: more accurate top triplets).
        full_svd: use the full SVD instead of the truncated one (exact, slower on large matrices).
        export_dir: at the end of ``fit``, save the model with restrained weights here (``save_pretrained``;
            ``python main.py export`` writes the same from a checkpoint).
    """

    @check_arguments
    def __init__(
        self,
        mode: Literal["posthoc", "inloop"] = "posthoc",
        log_base: GreaterThanOne | Literal["e", "linear"] = "e",
        every_n_steps: PositiveInt = 1,
        rank: PositiveInt = 8,
        niter: NonNegativeInt = 4,
        full_svd: bool = False,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.log_base: LogBase = log_base if isinstance(log_base, str) else float(log_base)
        self.every_n_steps = every_n_steps
        self.rank = rank
        self.niter = niter
        self.full_svd = full_svd
        self.export_dir = export_dir
        self.sigma_max: dict[str, float] = {}  # sigma_max(W) of every original
        self.restrained: dict[str, int] = {}  # restrained singular values at the last restraint
        self.restraints = 0  # how many times weights were restrained
        self._shadow: dict[str, torch.Tensor] = {}  # posthoc: the unrestrained W_n while restrained ones are in use

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, log_base=self.log_base, every_n_steps=self.every_n_steps)

    # -- policy --------------------------------------------------------------------------------------------------
    def should_restrain(self, step: int) -> bool:
        """Whether to restrain after ``step`` completed edit steps (``inloop``), or for an evaluation or export at
        ``step`` (``posthoc``: always). Override to change the schedule."""
        if self.mode == "posthoc":
            return True
        return step > 0 and step % self.every_n_steps == 0

    # -- the restraint -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def restrained_weights(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        """``W + U F(S) V^T`` of every edited matrix from its current value ``W_n`` (in the parameter's dtype and
        layout); records the number of restrained values in :attr:`restrained`."""
        out = {}
        for name, param in self._edited(pl_module).items():
            generator = torch.Generator(device=param.device).manual_seed(0)
            value, count = restrain(
                self.originals[name],
                param,
                self.sigma_max[name],
                self.log_base,
                self.rank,
                self.niter,
                self.full_svd,
                generator,
            )
            out[name] = value.to(param.dtype)
            self.restrained[name] = count
        return out

    @torch.no_grad()
    def count_restrained(self, pl_module: LightningModule) -> dict[str, int]:
        """Singular values of ``W_n - W`` at or above ``sigma_max(W)`` now: those a restraint changes (``posthoc``),
        or has changed (``inloop``: ``F(s) >= sigma_max``, so restrained values stay counted)."""
        counts = {}
        for name, param in self._edited(pl_module).items():
            generator = torch.Generator(device=param.device).manual_seed(0)
            delta = param.double() - self.originals[name].double()
            _, S, _ = singular_triplets_above(
                delta, self.sigma_max[name], self.rank, self.niter, self.full_svd, generator
            )
            counts[name] = int(S.numel())
        return counts

    @torch.no_grad()
    def _swap_in(self, pl_module: LightningModule) -> None:
        """Posthoc: keep ``W_n`` aside and put the restrained weights in its place."""
        params = self._edited(pl_module)
        restrained = self.restrained_weights(pl_module)
        self._shadow = {name: params[name].detach().clone() for name in restrained}
        for name, value in restrained.items():
            params[name].copy_(value)
        self.restraints += 1

    @torch.no_grad()
    def _swap_out(self, pl_module: LightningModule) -> None:
        """Posthoc: put ``W_n`` back."""
        params = self._edited(pl_module)
        for name, value in self._shadow.items():
            params[name].copy_(value)
        self._shadow = {}

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _on_originals(self, pl_module: LightningModule) -> None:
        self.sigma_max = {name: spectral_norm(w) for name, w in self.originals.items()}
        if self.log_base == "linear":
            return
        ln_base = math.log(math.e if self.log_base == "e" else self.log_base)
        for name, sigma in self.sigma_max.items():
            if sigma * ln_base < 1:
                rank_zero_warn(
                    f"PruneRestraint: sigma_max(W) = {sigma:.3g} of {name} is below 1 / ln(log_base); F then raises "
                    "singular values just above the threshold (see docs/prune.md)"
                )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._ensure_originals(pl_module)
        rank_zero_info(f"PruneRestraint: {self.mode} mode, log_base={self.log_base}, on {sorted(self.originals)}")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # no on_fit_start: restored (or unedited) originals, checked here
            self._ensure_originals(pl_module)
        # Swapped in at the first validation hook and out at the last, so every callback that evaluates in between
        # (whatever its place in the callback list) sees the restrained weights.
        if self.mode != "posthoc" or trainer.sanity_checking or not self.originals or self._shadow:
            return
        if self.should_restrain(trainer.global_step):
            self._swap_in(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.mode != "inloop" or not self.originals or not self.should_restrain(trainer.global_step):
            return
        params = self._edited(pl_module)
        for name, value in self.restrained_weights(pl_module).items():
            params[name].copy_(value)
        self.restraints += 1

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._shadow:
            self._swap_out(pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is None or not self.originals or not trainer.is_global_zero:
            return
        export_model(pl_module, self.export_dir, [self], trainer.global_step)
        rank_zero_info(f"PruneRestraint: exported the restrained model to {self.export_dir}")

    @contextlib.contextmanager
    def export_weights(self, pl_module: LightningModule, step: int) -> Iterator[None]:
        """The weights an export writes after ``step`` edit steps: in ``posthoc`` mode the restrained ones, swapped in
        for the ``with`` block and out after it (editing continues from ``W_n``); in ``inloop`` mode the weights as
        they are, already restrained. Without originals (a checkpoint that has none) the weights stay unrestrained,
        with a warning."""
        swap = (
            self.mode == "posthoc"
            and not self._shadow
            and self._ensure_originals(pl_module)
            and self.should_restrain(step)
        )
        if swap:
            self._swap_in(pl_module)
        try:
            yield
        finally:
            if swap:
                self._swap_out(pl_module)

    # -- state ---------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"restrained": dict(self.restrained), "restraints": self.restraints}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restrained = dict(state_dict.get("restrained", {}))
        self.restraints = state_dict.get("restraints", 0)

    def _payload(self) -> dict[str, Any]:
        return {"originals": self.originals, "sigma_max": dict(self.sigma_max)}

    def _load_payload(self, payload: dict[str, Any]) -> None:
        super()._load_payload(payload)
        self.sigma_max = dict(payload.get("sigma_max", {})) or {n: spectral_norm(w) for n, w in self.originals.items()}

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._shadow:  # saved mid-evaluation: the checkpoint must hold W_n, from which editing continues
            for name, value in self._shadow.items():
                checkpoint["state_dict"][f"model.{name}.weight"] = value.detach().clone()
