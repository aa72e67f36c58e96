"""MEMIT (Meng et al., 2023, arXiv 2210.07229): mass-editing memory in a transformer.

Each edited MLP output projection ``W`` takes the least-squares update that writes the residual ``R`` for this step's
keys ``K`` while keeping its outputs on the preserved-knowledge keys (second moment ``C0``):
``Delta = R K^T (lambda C0 + K K^T)^-1`` (paper eq. 14, DESIGN.md section 4). Sequential use simply repeats the step on
the already edited weights, which is why MEMIT degrades over long streams.
"""

from __future__ import annotations

import torch

from editing.methods.base import LocateThenEdit, solve_right


class MEMIT(LocateThenEdit):
    """MEMIT with the shared locate-then-edit toolkit; see :class:`LocateThenEdit` for the arguments."""

    def solve(self, i: int, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return solve_right(R @ K.T, self.mom2_weight * self.c0(i) + K @ K.T)
