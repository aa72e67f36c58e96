"""FT-L: constrained fine-tuning of one MLP output projection (ROME's baseline; Meng et al., 2022, arXiv 2202.05262).

Each step runs a few Adam steps on the weight of a single MLP output projection, minimising the teacher-forced NLL of
``target_new`` after the request prompt, and after every Adam step clamps the change to an L-inf ball
(``|W - W_anchor| <= norm_constraint`` elementwise). ROME's and AlphaEdit's FT-L anchor the box at the weights as they
were when the edit began, so every edit gets a fresh box and the cumulative change is unbounded (``box: per_edit``, the
default); ``box: original`` anchors it at the unedited weights, capping the cumulative change for good (this project's
earlier variant). No preserved-knowledge term holds the rest of the model in place, so under sequential editing it
degrades quickly: the baseline on which PRUNE's restraint (``callbacks.PruneRestraint``, DESIGN.md section 7) is
easiest to see.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from editing.arguments import check_arguments
from editing.distributed import share, sum_across
from editing.forward import target_log_probs
from editing.methods.base import EditMethod
from editing.models import EditedWeight, default_mlp_layers
from editing.requests import EditRequest
from editing.rows import EncodedRows, encode_rows, mean_per_row


class FineTune(EditMethod):
    """FT-L: gradient steps on one layer's MLP output projection, L-inf constrained around the weight at the start of
    each edit (or the original weight).

    The weight is trained through a float32 master copy (so bfloat16/float16 models take exact Adam steps); only the
    edited weight carries gradients, and only while a step runs.

    Args:
        layer: the edited block (its MLP output projection); ``None`` picks the middle one of the five early-middle
            blocks MEMIT would edit (:func:`editing.models.default_mlp_layers`).
        lr: Adam learning rate (ROME's FT-L: 5e-4).
        steps: maximum gradient steps per edit batch (ROME's FT-L: 25).
        norm_constraint: bound on the change of each entry (ROME's FT-L: 5e-4); ``None`` fine-tunes without a bound
            (plain FT).
        box: what the bound is measured from: ``per_edit`` (the weights at the start of each edit step, as ROME's and
            AlphaEdit's releases) or ``original`` (the unedited weights, a cap on the cumulative change).
        stop_loss: stop a step early once the mean target NLL falls below this value (ROME's FT: 1e-2).
    """

    @check_arguments
    def __init__(
        self,
        layer: NonNegativeInt | None = None,
        lr: PositiveFloat = 5e-4,
        steps: PositiveInt = 25,
        norm_constraint: PositiveFloat | None = 5e-4,
        stop_loss: NonNegativeFloat = 1e-2,
        box: Literal["per_edit", "original"] = "per_edit",
    ) -> None:
        super().__init__()
        self.layer = layer
        self.lr = lr
        self.steps = steps
        self.norm_constraint = norm_constraint
        self.stop_loss = stop_loss
        self.box = box
        self._weight: EditedWeight | None = None
        self._log: dict[str, float] = {}

    # -- binding -----------------------------------------------------------------------------------------------
    def configure(self, model_id: str, cache_dir: Path) -> None:
        model = self.model
        if self.layer is None:
            candidates = default_mlp_layers(model)
            self.layer = candidates[len(candidates) // 2]
        self._weight = EditedWeight(model, self.layer)
        # W0 in the parameter's storage layout (the clamp is elementwise, so the layout does not matter). Taken before
        # any checkpoint is restored, so it is the unedited weight even when a run resumes.
        self.register_buffer("w0", self._weight.parameter.detach().clone(), persistent=False)

    def edited_weights(self) -> dict[str, EditedWeight]:
        return {self._weight.name: self._weight} if self._weight is not None else {}

    # -- one step ----------------------------------------------------------------------------------------------
    def prepare(self, requests: Sequence[EditRequest]) -> EncodedRows | None:
        """The request prompts followed by their ``target_new`` tokens (teacher forcing), on the model's device: this
        rank's share of them in a multi-process run (``None`` when it has none)."""
        self.timings = {"targets": 0.0, "keys": 0.0, "solve": 0.0}
        mine = share(requests)
        if not mine:
            return None
        texts, targets = [r.text for r in mine], [r.target_new for r in mine]
        return encode_rows(self.tokenizer, texts, None, targets, device=self.model.device)

    def apply(self, requests: Sequence[EditRequest], plan: EncodedRows | None) -> None:
        start = time.perf_counter()
        param = self._weight.parameter
        master = param.detach().float().clone()  # float32 copy that Adam updates
        anchor = self.w0.float() if self.box == "original" else master.clone()
        opt = torch.optim.Adam([master], lr=self.lr)
        loss, used = float("nan"), self.steps
        param.requires_grad_(True)
        try:
            for step in range(self.steps):
                with torch.enable_grad():
                    # the mean over the step's requests (each weighs equally, whatever its target length) as a sum of
                    # the ranks' shares, so that the gradients summed over the ranks are the single process's
                    nll = self.target_nll(plan).sum() / len(requests) if plan is not None else param.sum() * 0
                    loss = float(sum_across(nll.detach().double().reshape(1)).item())
                    if loss < self.stop_loss:
                        used = step
                        break
                    param.grad = None
                    nll.backward()
                master.grad = sum_across(param.grad.float())
                opt.step()
                with torch.no_grad():
                    if self.norm_constraint is not None:
                        master.copy_(anchor + (master - anchor).clamp(-self.norm_constraint, self.norm_constraint))
                    param.copy_(master.to(param.dtype))
        finally:
            param.requires_grad_(False)
            param.grad = None
        self.timings["solve"] = time.perf_counter() - start
        self._log = {"train/ft_loss": loss, "train/ft_steps": float(used)}

    def target_nll(self, rows: EncodedRows) -> torch.Tensor:
        """``(B,)`` mean per-token NLL of each row's target, the LM head applied at target positions only."""
        log_p, r, ids = target_log_probs(self.model, rows)  # (N_tokens, V)
        return mean_per_row(-log_p.gather(1, ids[:, None])[:, 0], r, len(rows))

    def step_log(self) -> dict[str, float]:
        return dict(self._log)
