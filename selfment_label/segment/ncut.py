"""Normalized Cut on a patch affinity graph (TokenCut), batched, in torch, on any device.

The generalized problem ``(D - A) v = lambda D v`` is solved through the symmetric
normalised affinity ``M = D^-1/2 A D^-1/2``: its top eigenvector ``D^1/2 1`` is known in
closed form, so it is deflated away and the second-smallest generalized eigenvector comes
from the top eigenvector of the deflated, shifted matrix. A block subspace iteration with
Rayleigh-Ritz finds it with a handful of ``N x N @ N x k`` products: no dense
eigendecomposition of the N x N matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import SingleConfig

logger = logging.getLogger(__name__)


def pair_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of patches, ``[B, N, N]`` in the tokens' dtype.

    Arguments:
      tokens: ``[B, N, D]`` patch tokens.
    """
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    return unit @ unit.transpose(1, 2)


def linked(cosine: torch.Tensor, tau: float = SingleConfig.tau, eps: float = 1e-5) -> torch.Tensor:
    """TokenCut's binary affinity from pair cosines: 1 above ``tau``, ``eps`` elsewhere.

    Arguments:
      cosine: ``[B, N, N]`` pair cosines (``pair_cosine``).
      tau: cosine similarity above which two patches are linked with weight 1.
      eps: weight of every other edge (keeps the graph connected).

    Returns:
      ``[B, N, N]`` affinity in the cosines' dtype.
    """
    return torch.full_like(cosine, eps).masked_fill_(cosine > tau, 1.0)


def affinity(
    tokens: torch.Tensor, tau: float = SingleConfig.tau, eps: float = 1e-5
) -> torch.Tensor:
    """TokenCut's binary affinity of L2-normalised tokens (``linked(pair_cosine(tokens))``).

    Arguments:
      tokens: ``[B, N, D]`` patch tokens.
      tau: cosine similarity above which two patches are linked with weight 1.
      eps: weight of every other edge (keeps the graph connected).

    Returns:
      ``[B, N, N]`` affinity in the tokens' dtype.
    """
    return linked(pair_cosine(tokens), tau, eps)


@dataclass
class EigenResult:
    """Second-smallest generalized eigenvectors.

    Arguments:
      vectors: ``[B, N]`` generalized eigenvectors ``v`` of ``(D - A) v = lambda D v``.
      values: ``[B]`` their eigenvalues ``lambda``.
      iterations: ``[B]`` block products with the matrix each image needed.
      converged: ``[B]`` whether each image's Ritz residual fell below the tolerance (False:
        it stopped at the cap).
    """

    vectors: torch.Tensor
    values: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor


def second_eigenvector(
    adjacency: torch.Tensor,
    block: int = 8,
    max_iter: int = 300,
    tol: float = 1e-5,
    check_every: int = 8,
    seed: int = 0,
) -> EigenResult:
    """Second-smallest generalized eigenvector of ``(D - A) v = lambda D v`` for a batch.

    Chebyshev-filtered subspace iteration on the deflated normalised affinity: between two
    Rayleigh-Ritz steps the block is multiplied by a Chebyshev polynomial of degree
    ``check_every`` that is small on ``[-1, c]`` (``c`` = the block's smallest Ritz value)
    and grows fast above it, so the wanted eigenvector separates from the rest far faster
    than with plain powers, while each step still reads the N x N matrix once for the
    whole block.

    Every image starts from the same seeded block and leaves the batch as soon as its own
    residual is below ``tol``, so its result does not depend on the other images of the
    batch (alone, in any batch, or after a resume).

    Arguments:
      adjacency: ``[B, N, N]`` symmetric non-negative affinities.
      block: subspace size; larger converges in fewer iterations.
      max_iter: cap on block products with the matrix.
      tol: an image is done when its Ritz residual norm is below this.
      check_every: degree of the Chebyshev filter (block products between residual checks).
      seed: seed of the random start block (results are deterministic).

    Returns:
      An ``EigenResult``; vectors are normalised to unit D-norm.
    """
    a = adjacency
    bsz, n, _ = a.shape
    degree = a.sum(-1)
    inv_sqrt = degree.rsqrt()
    m = (inv_sqrt[:, :, None] * a).mul_(inv_sqrt[:, None, :])
    top = degree.sqrt()
    top = top / top.norm(dim=-1, keepdim=True)
    k = min(block, max(n - 1, 1))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(1, n, k, generator=generator, dtype=a.dtype).to(a.device)
    q, _ = torch.linalg.qr(start.expand(bsz, n, k).contiguous())

    vectors = torch.zeros(bsz, n, dtype=a.dtype, device=a.device)
    ritz = torch.zeros(bsz, dtype=a.dtype, device=a.device)
    iterations = torch.zeros(bsz, dtype=torch.long)
    converged = torch.zeros(bsz, dtype=torch.bool)
    active = torch.arange(bsz, device=a.device)

    def apply(x: torch.Tensor) -> torch.Tensor:
        # M x with the known top eigenvector D^1/2 1 (eigenvalue 1) deflated to 0
        x = x - top[:, :, None] * (top[:, None, :] @ x)
        return m @ x

    count = 0
    mq = apply(q)
    while True:
        vals, vecs = torch.linalg.eigh(q.transpose(1, 2) @ mq)
        q = q @ vecs
        mq = mq @ vecs
        count += 1
        residual = (mq[:, :, -1] - vals[:, -1, None] * q[:, :, -1]).norm(dim=-1)
        done = residual < tol
        leaving = done | (count >= max_iter)
        if bool(leaving.any()):
            which = active[leaving]
            vectors[which] = q[leaving, :, -1]
            ritz[which] = vals[leaving, -1]
            iterations[which.cpu()] = count
            converged[which.cpu()] = done[leaving].cpu()
            keep = ~leaving
            active, q, mq, vals = active[keep], q[keep], mq[keep], vals[keep]
            m, top = m[keep], top[keep]
        if active.numel() == 0:
            break
        degree_now = max(1, min(check_every, max_iter - count))
        q, _ = torch.linalg.qr(_chebyshev_filter(apply, q, mq, vals[:, 0], degree_now))
        count += degree_now - 1
        mq = apply(q)
    v = vectors * inv_sqrt
    v = v / (v.square() * degree).sum(-1, keepdim=True).sqrt()
    # eigenvalue of M is mu; generalized eigenvalue lambda = 1 - mu
    if not bool(converged.all()):
        logger.debug("ncut eigensolver: %d image(s) stopped at the cap", int((~converged).sum()))
    return EigenResult(vectors=v, values=1.0 - ritz, iterations=iterations, converged=converged)


def _chebyshev_filter(
    apply: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    ax: torch.Tensor,
    cut: torch.Tensor,
    degree: int,
    lower: float = -1.0,
) -> torch.Tensor:
    """``T_degree`` of the operator mapped so that ``[lower, cut]`` -> ``[-1, 1]``, on ``x``.

    The spectrum of the normalised affinity lies in ``[-1, 1]``; eigenvalues above ``cut``
    are amplified by ``T_degree`` (exponentially in the degree), the others stay bounded.
    ``ax`` is ``apply(x)``, already known; ``cut`` is ``[B]``.
    """
    half = ((cut - lower) / 2).clamp_min(1e-3)[:, None, None]
    centre = ((cut + lower) / 2)[:, None, None]
    previous, current = x, (ax - centre * x) / half
    for _ in range(degree - 1):
        previous, current = current, 2 * (apply(current) - centre * current) / half - previous
    return current


def seed_component(mask: torch.Tensor, seed: torch.Tensor, check_every: int = 8) -> torch.Tensor:
    """4-connected component of ``mask`` that holds the seed patch, batched, on any device.

    A flood fill by repeated cross-shaped dilation restricted to the mask; it runs on the
    mask's device with a host sync only every ``check_every`` steps.

    Arguments:
      mask: ``[B, rows, cols]`` boolean masks.
      seed: ``[B]`` flat index of the seed patch in each mask (must lie inside it).
      check_every: dilation steps between convergence checks.

    Returns:
      ``[B, rows, cols]`` boolean component masks.
    """
    b, rows, cols = mask.shape
    region = torch.zeros(b, rows * cols, dtype=torch.bool, device=mask.device)
    region[torch.arange(b, device=mask.device), seed] = True
    region = region.view(b, rows, cols) & mask
    while True:
        before = region
        for _ in range(check_every):
            grown = region.clone()
            grown[:, 1:, :] |= region[:, :-1, :]
            grown[:, :-1, :] |= region[:, 1:, :]
            grown[:, :, 1:] |= region[:, :, :-1]
            grown[:, :, :-1] |= region[:, :, 1:]
            region = grown & mask
        if torch.equal(region, before):
            return region


def bipartition(vectors: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """TokenCut's split of eigenvectors into foreground patch masks, batched.

    Foreground is ``v > mean(v)``; the seed is ``argmax |v|``; if the seed falls in the
    background the split is flipped; only the 4-connected component holding the seed is kept.

    Arguments:
      vectors: ``[B, N]`` eigenvectors.
      grid: ``(rows, cols)`` with ``rows * cols == N``.

    Returns:
      ``[B, rows, cols]`` boolean foreground masks on the vectors' device.
    """
    fg = vectors > vectors.mean(dim=-1, keepdim=True)
    seed = vectors.abs().argmax(dim=-1)
    seed_is_fg = fg.gather(1, seed[:, None])
    fg = torch.where(seed_is_fg, fg, ~fg)
    return seed_component(fg.view(-1, *grid), seed)


def normalized_cut(
    cosine: torch.Tensor, grid: tuple[int, int], tau: float = SingleConfig.tau, eps: float = 1e-5
) -> tuple[torch.Tensor, EigenResult]:
    """Foreground patch masks of a batch of images that share one patch grid.

    Arguments:
      cosine: ``[B, N, N]`` pair cosines of the patch tokens (``pair_cosine``; the caller
        keeps them for the other tests it makes on the same pairs).
      grid: ``(rows, cols)`` of the patch grid.
      tau: affinity threshold.
      eps: weight of unlinked pairs.

    Returns:
      ``([B, rows, cols]`` boolean masks on the cosines' device, the eigen result).
    """
    result = second_eigenvector(linked(cosine, tau, eps))
    return bipartition(result.vectors, grid), result
