"""AlphaEdit (Fang et al., 2025, arXiv 2410.02355): null-space constrained knowledge editing.

The update is projected onto the null space of the preserved keys, ``P = U U^T`` from the eigenvectors of ``C0`` with
eigenvalues below a threshold, so outputs on preserved knowledge cannot change; past edits are kept by their summed key
outer products ``Kp Kp^T``: ``Delta = R K^T P (Kp Kp^T P + K K^T P + l2 I)^-1`` (DESIGN.md section 4).
"""

from __future__ import annotations

import logging

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from editing.arguments import check_arguments
from editing.methods.base import LocateThenEdit, solve_right

log = logging.getLogger(__name__)


class AlphaEdit(LocateThenEdit):
    """AlphaEdit on the shared toolkit.

    Args:
        nullspace_threshold: eigenvalues of ``C0`` below this span the null space edits may use (paper: 2e-2).
        l2: ridge term added to the projected system: the paper writes ``I`` (1); the release's hparams for Llama3-8B,
            GPT-J and GPT2-XL all set ``L2 = 10``, the default here (docs/fidelity.md).
        **kwargs: the :class:`~editing.methods.base.LocateThenEdit` arguments.
    """

    @check_arguments
    def __init__(self, *args, nullspace_threshold: PositiveFloat = 2e-2, l2: NonNegativeFloat = 10.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nullspace_threshold = nullspace_threshold
        self.l2 = l2

    def setup_state(self) -> None:
        for i in range(len(self.layers)):
            c0 = self.c0(i)
            eigvals, eigvecs = torch.linalg.eigh(c0)
            null = eigvecs[:, eigvals < self.nullspace_threshold]
            log.info(
                "AlphaEdit layer %d: null space of C0 has dimension %d of %d", self.layers[i], null.shape[1], len(c0)
            )
            if null.shape[1] == 0:
                log.warning(
                    "AlphaEdit: no eigenvalue of C0 is below %g: edits of layer %d are projected to zero",
                    self.nullspace_threshold,
                    self.layers[i],
                )
            self.register_buffer(f"projection_{i}", null @ null.T, persistent=False)
            self.register_buffer(f"past_kk_{i}", torch.zeros_like(c0))

    def solve(self, i: int, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        P = getattr(self, f"projection_{i}")
        eye = torch.eye(len(P), dtype=P.dtype, device=P.device)
        return solve_right(R @ K.T @ P, (getattr(self, f"past_kk_{i}") + K @ K.T) @ P + self.l2 * eye)

    def after_layer_update(self, i: int, W: torch.Tensor, K: torch.Tensor) -> None:
        getattr(self, f"past_kk_{i}").add_(K @ K.T)
