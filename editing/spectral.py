"""Spectral mathematics of edited matrices (DESIGN.md section 7), as plain functions: PRUNE's restraint and the
condition-number statistics behind it (Ma et al., 2024, arXiv 2405.16821).

- :func:`restraint_function`: PRUNE's ``F``, which bounds the singular values of the accumulated edit that reach
  ``sigma_max(W)``; :func:`restrain`: the restrained weight ``W + U F(S) V^T`` from a truncated SVD
  (:func:`singular_triplets_above`, :func:`randomized_svd`).
- :func:`spectral_stats`: ``kappa``, ``sigma_max``, norms of ``W_n`` and of ``W_n - W`` (:func:`singular_value_range`).

The callbacks :class:`callbacks.PruneRestraint` and :class:`callbacks.ConditionNumberMonitor` only decide when they
run.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LogBase = float | Literal["e", "linear"]


def restraint_function(s: torch.Tensor, sigma_max: float, log_base: LogBase = "e") -> torch.Tensor:
    """PRUNE's ``F``: singular values ``s >= sigma_max`` become ``sigma_max + log_b(s / sigma_max)``, ``b`` being
    ``log_base`` (the paper's alpha).

    ``log_base="linear"`` is the ablation ``(s + sigma_max) / 2``. Values below ``sigma_max`` are returned unchanged,
    and ``F(sigma_max) = sigma_max``, so ``F`` is continuous at the threshold.

    Note that ``F`` is not scale-free: its slope at the threshold is ``1 / (sigma_max ln b)``, so for
    ``sigma_max < 1 / ln(b)`` it raises values just above the threshold instead of lowering them.

    Example:
        >>> restraint_function(torch.tensor([1.0, 2.0, 2.0 * math.e]), 2.0)
        tensor([1., 2., 3.])
    """
    if log_base == "linear":
        restrained = (s + sigma_max) / 2
    else:
        base = math.e if log_base == "e" else float(log_base)
        restrained = sigma_max + torch.log(s / sigma_max) / math.log(base)
    return torch.where(s >= sigma_max, restrained, s)


def randomized_svd(
    M: torch.Tensor, k: int, niter: int = 4, oversample: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``M: (m, n)`` by a randomized range finder with power iterations.

    Halko, Martinsson and Tropp (2011), algorithms 4.4 + 5.1: sketch ``M G`` with ``k + oversample`` Gaussian columns,
    re-orthonormalise through ``niter`` power iterations, then take the exact SVD of ``Q^T M``. The estimated singular
    values are lower bounds that converge fast when the spectrum is separated. Uses its own ``generator`` so the
    global random state (and so a run's editing trajectory) is untouched.

    Returns:
        ``U: (m, k)``, ``S: (k,)`` descending, ``V: (n, k)`` with ``M ~ U diag(S) V^T``.
    """
    m, n = M.shape
    q = min(k + oversample, m, n)
    G = torch.randn(n, q, dtype=M.dtype, device=M.device, generator=generator)  # (n, q)
    Q = torch.linalg.qr(M @ G).Q  # (m, q)
    for _ in range(niter):
        Q = torch.linalg.qr(M.mT @ Q).Q  # (n, q)
        Q = torch.linalg.qr(M @ Q).Q  # (m, q)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)  # (q, q), (q,), (q, n)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].mT


def singular_triplets_above(
    M: torch.Tensor,
    threshold: float,
    rank: int = 8,
    niter: int = 4,
    full_svd: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every singular triplet of ``M`` whose value is ``>= threshold`` (and no others).

    A truncated SVD is exact for this purpose only if it reaches below the threshold: the rank starts at ``rank`` and
    doubles until the smallest computed value is below ``threshold``; once it would cover half the spectrum (or with
    ``full_svd``) the full SVD is used instead.

    Returns:
        ``U: (m, r)``, ``S: (r,)``, ``V: (n, r)`` of the ``r`` values ``>= threshold``.
    """
    smallest = min(M.shape)
    k = max(1, rank)
    while True:
        if full_svd or 2 * k >= smallest:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            V = Vh.mT
            break
        U, S, V = randomized_svd(M, k, niter, generator=generator)
        if S[-1] < threshold:
            break
        k *= 2
    keep = S >= threshold
    return U[:, keep], S[keep], V[:, keep]


def restrain(
    original: torch.Tensor,
    current: torch.Tensor,
    sigma_max: float,
    log_base: LogBase = "e",
    rank: int = 8,
    niter: int = 4,
    full_svd: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """PRUNE's restrained weight ``W + U F(S) V^T`` for ``Delta = current - original = U S V^T``, in float64.

    Triplets with ``s < sigma_max`` keep ``F(s) = s``, so with the ``r`` restrained triplets ``(U_r, S_r, V_r)`` the
    result equals ``W + Delta + U_r (F(S_r) - S_r) V_r^T`` exactly; that form needs only the top triplets. The result
    replaces ``current``; it is not an update to add to it.

    Args:
        original: ``W``, the unedited matrix (any layout; singular values do not depend on it).
        current: ``W_n``, the same matrix after ``n`` edits.
        sigma_max: ``sigma_max(W)``, the threshold.
        log_base, rank, niter, full_svd, generator: see :func:`restraint_function` and :func:`singular_triplets_above`.

    Returns:
        The restrained matrix (float64, shape of ``current``) and the number of restrained singular values.
    """
    W = original.double()
    delta = current.double() - W
    U, S, V = singular_triplets_above(delta, sigma_max, rank, niter, full_svd, generator)
    restrained = W + delta
    if S.numel():
        restrained += (U * (restraint_function(S, sigma_max, log_base) - S)) @ V.mT
    return restrained, int(S.numel())


def spectral_norm(M: torch.Tensor) -> float:
    """``sigma_max(M)`` exactly, in float64 (computed once per matrix; see ``ConditionNumberMonitor`` for cheaper
    repeated estimates)."""
    return float(torch.linalg.matrix_norm(M.double(), ord=2))


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
