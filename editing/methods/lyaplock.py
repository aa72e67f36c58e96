"""LyapLock (arXiv 2505.15702): bounded knowledge preservation for sequential editing via a Lyapunov virtual queue.

Sequential editing is a constrained stochastic program: minimise the long-run editing loss subject to the long-run
preservation loss ``D(W) = tr[(W - W0) C0 (W - W0)^T] <= budget * D_base``. Drift-plus-penalty turns it into one
weighted least-squares problem per step, whose weight on preservation is the virtual queue ``Q``: it grows while ``D``
runs above the budget and falls back to 1 when below. All earlier edits are replayed through the sums
``Svk = sum V_p K_p^T`` and ``Skk = sum K_p K_p^T`` (DESIGN.md section 5).

Per layer, step 1: ``Delta = [R K^T + lambda (W0 - W) C0] [K K^T + lambda C0]^-1``, then ``D_base = D(W)``.
Step t >= 2: ``A = V K K^T + lambda Q C0 + V Skk``, ``B = V R K^T + lambda Q (W0 - W) C0 + V (Svk - W Skk)``,
``Delta = B A^-1``. After each step: ``Q <- max(Q + D(W) / (budget D_base) - 1, 1)``.

With ``nullspace_threshold`` the same objective is minimised over updates in the null space of C0 (AlphaEdit's
projection ``P``), with AlphaEdit's ridge ``l2 ||Delta||^2``: ``Delta = B P (A P + l2 I)^-1``. DESIGN.md section 5 has
no projection; the project's mission names LyapLock "with AlphaEdit's null-space projection", and the paper says
LyapLock can also enhance baseline editors: a switch, off by default (docs/fidelity.md, measured in
docs/long_stream.md).
"""

from __future__ import annotations

import torch
from jsonargparse.typing import PositiveFloat

from editing.arguments import check_arguments
from editing.methods.alphaedit import nullspace_projection, projected_solve
from editing.methods.base import LocateThenEdit, solve_right


def preservation_loss(W: torch.Tensor, W0: torch.Tensor, C0: torch.Tensor) -> torch.Tensor:
    """``D(W) = tr[(W - W0) C0 (W - W0)^T]`` in the difference form (no cancellation between large terms)."""
    diff = W - W0
    return ((diff @ C0) * diff).sum()


def next_queue(Q: torch.Tensor, D: torch.Tensor, budget: float, D_base: torch.Tensor) -> torch.Tensor:
    """Normalised virtual-queue recursion ``max(Q + D / (budget D_base) - 1, 1)`` (DESIGN.md section 5)."""
    return torch.clamp(Q + D / (budget * D_base) - 1, min=1.0)


class LyapLock(LocateThenEdit):
    """LyapLock on the shared toolkit.

    Args:
        budget: the preservation budget as a multiple of ``D_base``: the queue threshold is ``budget * D_base``
            (release: 60). The paper writes the threshold itself as ``D``; this multiple is the release's setting
            (``alpha`` in DESIGN.md section 5), named for what it is.
        V: weight of the editing loss (current and replayed edits) against the queue-weighted preservation (release: 1).
        mom2_weight: lambda (release: 1000).
        nullspace_threshold: ``None`` (DESIGN.md section 5: no projection) or AlphaEdit's threshold (2e-2): each
            update is restricted to the null space of C0 spanned by its eigenvectors below it.
        l2: the ridge of the projected solve (AlphaEdit's release: 10), positive as in AlphaEdit; used only with
            ``nullspace_threshold``.
        **kwargs: the :class:`~editing.methods.base.LocateThenEdit` arguments.
    """

    @check_arguments
    def __init__(
        self,
        *args,
        budget: PositiveFloat = 60.0,
        V: PositiveFloat = 1.0,
        mom2_weight: PositiveFloat = 1000.0,
        nullspace_threshold: PositiveFloat | None = None,
        l2: PositiveFloat = 10.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, mom2_weight=mom2_weight, **kwargs)
        self.budget = budget
        self.V = V
        self.nullspace_threshold = nullspace_threshold
        self.l2 = l2

    def setup_state(self) -> None:
        for i, w in enumerate(self.edited_weights().values()):
            d_v, d_k = w.get().shape
            dev = w.parameter.device
            self.register_buffer(f"queue_{i}", torch.ones((), dtype=torch.float64, device=dev))
            self.register_buffer(f"d_base_{i}", torch.zeros((), dtype=torch.float64, device=dev))
            # D(W) / (budget D_base) after the last step: the share of the preservation budget in use
            self.register_buffer(f"budget_ratio_{i}", torch.zeros((), dtype=torch.float64, device=dev))
            self.register_buffer(f"svk_{i}", torch.zeros(d_v, d_k, dtype=torch.float64, device=dev))
            self.register_buffer(f"skk_{i}", torch.zeros(d_k, d_k, dtype=torch.float64, device=dev))
            if self.nullspace_threshold is not None:  # derived from C0: not checkpointed
                P = nullspace_projection(self.c0(i), self.nullspace_threshold, self.layers[i])
                self.register_buffer(f"projection_{i}", P, persistent=False)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def state(self, i: int, name: str) -> torch.Tensor:
        """Per-layer state tensor ``name`` in {queue, d_base, budget_ratio, svk, skk} of edited layer ``i``."""
        return getattr(self, f"{name}_{i}")

    def solve(self, i: int, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        C0, W0, lam = self.c0(i), self.w0(i).double(), self.mom2_weight
        anchor = (W0 - W) @ C0
        if self.steps_done == 0:
            A, B = K @ K.T + lam * C0, R @ K.T + lam * anchor
        else:
            Q, V = self.state(i, "queue"), self.V
            skk, svk = self.state(i, "skk"), self.state(i, "svk")
            A = V * (K @ K.T) + lam * Q * C0 + V * skk
            B = V * (R @ K.T) + lam * Q * anchor + V * (svk - W @ skk)
        if self.nullspace_threshold is None:
            return solve_right(B, A)
        return projected_solve(B, A, self.state(i, "projection"), self.l2)

    def after_layer_update(self, i: int, W: torch.Tensor, K: torch.Tensor) -> None:
        self.state(i, "svk").add_((W @ K) @ K.T)  # V_p = W_new K_p, recorded right after this step's update
        self.state(i, "skk").add_(K @ K.T)
        D = preservation_loss(W, self.w0(i).double(), self.c0(i))
        if self.steps_done == 0:
            self.state(i, "d_base").copy_(D.clamp(min=torch.finfo(torch.float64).tiny))
        self.state(i, "budget_ratio").copy_(D / (self.budget * self.state(i, "d_base")))
        queue = self.state(i, "queue")
        queue.copy_(next_queue(queue, D, self.budget, self.state(i, "d_base")))

    def after_step(self) -> None:
        self.steps_done += 1

    def step_log(self) -> dict[str, float]:
        values = super().step_log()
        for i, layer in enumerate(self.layers):
            values[f"lyaplock/layer_{layer:02d}/queue"] = float(self.state(i, "queue"))
            values[f"lyaplock/layer_{layer:02d}/budget_ratio"] = float(self.state(i, "budget_ratio"))
        return values
