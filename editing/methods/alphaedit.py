"""AlphaEdit (Fang et al., 2025, arXiv 2410.02355): null-space constrained knowledge editing.

The update is projected onto the null space of the preserved keys, ``P = U U^T`` from the eigenvectors of ``C0`` with
eigenvalues below a threshold, so outputs on preserved knowledge cannot change; past edits are kept by their summed key
outer products ``Kp Kp^T``: ``Delta = R K^T P (Kp Kp^T P + K K^T P + l2 I)^-1`` (DESIGN.md section 4).
"""

from __future__ import annotations

import logging

import torch
from jsonargparse.typing import PositiveFloat

from editing.arguments import check_arguments
from editing.methods.base import LocateThenEdit, solve_right

log = logging.getLogger(__name__)


def nullspace_projection(c0: torch.Tensor, threshold: float, layer: int) -> torch.Tensor:
    """``P = U U^T`` over the eigenvectors of ``C0`` whose eigenvalues are below ``threshold``: updates of the form
    ``X P`` leave the outputs on preserved keys unchanged (AlphaEdit; LyapLock's ``nullspace_threshold``)."""
    eigvals, eigvecs = torch.linalg.eigh(c0)
    null = eigvecs[:, eigvals < threshold]
    log.info("layer %d: null space of C0 has dimension %d of %d", layer, null.shape[1], len(c0))
    if null.shape[1] == 0:
        log.warning("no eigenvalue of C0 is below %g: edits of layer %d are projected to zero", threshold, layer)
    return null @ null.T


def projected_solve(B: torch.Tensor, A: torch.Tensor, P: torch.Tensor, l2: float) -> torch.Tensor:
    """The minimiser ``Delta = X P`` of ``tr[Delta A Delta^T] - 2 tr[B Delta^T] + l2 ||Delta||^2``:
    ``Delta = B P (A P + l2 I)^-1`` (AlphaEdit's closed form; with ``l2 > 0`` the solution satisfies
    ``Delta = Delta P``, so preserved directions are untouched)."""
    eye = torch.eye(len(P), dtype=P.dtype, device=P.device)
    return solve_right(B @ P, A @ P + l2 * eye)


class AlphaEdit(LocateThenEdit):
    """AlphaEdit on the shared toolkit.

    Args:
        nullspace_threshold: eigenvalues of ``C0`` below this span the null space edits may use (paper: 2e-2).
        l2: ridge term added to the projected system: the paper writes ``I`` (1); the release's hparams for Llama3-8B,
            GPT-J and GPT2-XL all set ``L2 = 10``, the default here (docs/fidelity.md). It must be positive: the
            projected system ``A P`` alone is singular (``P`` drops the retained directions).
        **kwargs: the :class:`~editing.methods.base.LocateThenEdit` arguments.
    """

    @check_arguments
    def __init__(self, *args, nullspace_threshold: PositiveFloat = 2e-2, l2: PositiveFloat = 10.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nullspace_threshold = nullspace_threshold
        self.l2 = l2

    def setup_state(self) -> None:
        for i in range(len(self.layers)):
            c0 = self.c0(i)
            self.register_buffer(
                f"projection_{i}", nullspace_projection(c0, self.nullspace_threshold, self.layers[i]), persistent=False
            )
            self.register_buffer(f"past_kk_{i}", torch.zeros_like(c0))

    def solve(self, i: int, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        A = getattr(self, f"past_kk_{i}") + K @ K.T
        return projected_solve(R @ K.T, A, getattr(self, f"projection_{i}"), self.l2)

    def after_layer_update(self, i: int, W: torch.Tensor, K: torch.Tensor) -> None:
        getattr(self, f"past_kk_{i}").add_(K @ K.T)
