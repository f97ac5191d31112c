"""The functional core of COSMOS: one step of the per-matrix maths on a stack of matrices.

Torch only. :func:`cosmos_direction` updates the state stacks in place and returns the
unit-RMS update direction; the class :class:`lit_cosmos.COSMOS` only buckets matrices, builds
state and applies the direction. Cross-process sums and the owner-rank Newton-Schulz go through
the ``comm`` seam (:class:`lit_cosmos.distributed.Comm`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from lit_cosmos.core import kernels as F
from lit_cosmos.distributed import Comm

__all__ = ["combine", "cosmos_direction", "momentum_estimate", "update_subspace"]

#: Parts of the update below this many machine epsilons of the matrix's norm count as zero.
_ROUNDOFF = 1000.0


def momentum_estimate(G: Tensor, M: Tensor, *, t: int, beta1: float, nesterov: bool) -> Tensor:
    r"""The bias-corrected momentum ``X`` that COSMOS splits, after ``M`` took step ``t``:
    :math:`((1-\beta_1) G + \beta_1 M) / (1-\beta_1^{t+1})` (Nesterov) or
    :math:`M / (1-\beta_1^t)`. A new tensor."""
    if nesterov:
        return torch.lerp(G, M, beta1).div_(1.0 - beta1 ** (t + 1))
    return M / (1.0 - beta1**t)


def update_subspace(
    G: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    *,
    init: bool,
    refresh: bool,
    power_iters: int,
    beta2: float,
    comm: Comm,
    products: F.Products = F.FLOAT32_PRODUCTS,
) -> None:
    """The subspace half of a step, in place: the first basis (``init``), a power-iteration
    refresh (``refresh``) or plain accumulation of ``S`` in the current basis; then ``V``.

    ``U`` (b, n, r), ``S`` (b, r, r) and ``V`` (b, m, r) are updated; ``G`` (b, m, n) is read.
    """
    r = U.size(-1)
    if r == 0:
        return
    # U and S are replicated state: every rank must hold the same bits, or a checkpoint (which
    # stores one copy of them) resumes the other ranks with values they never had. Each is
    # therefore taken from one rank (comm.replicate) whenever it changes, never trusted to come
    # out bitwise equal from rank-local maths on equal inputs: QR, matmuls and elementwise
    # kernels may round differently on another rank (thread count, CPU features).
    if init:
        U_new = comm.replicate(F.initial_basis(G, r, reduce=comm.all_reduce))
        GU = G @ U_new
        S_new = (1.0 - beta2) * comm.all_reduce(GU.mT @ GU)
        U.copy_(U_new)
        S.copy_(comm.replicate(S_new))
    elif refresh:
        U_new, S_new, GU = F.refresh_basis(U, S, G, beta2, power_iters, reduce=comm.all_reduce,
                                           replicate=comm.replicate, products=products)
        U.copy_(U_new)
        S.copy_(comm.replicate(S_new))
    else:
        GU = products.mm(G, U)
        # Scaled before the add: under torch.compile (torch 2.14, CPU) ``add_(mm, alpha=a)`` after
        # ``mul_`` loses its ``alpha``, like pytorch/pytorch#167313 for addmm; the compile test
        # in tests/test_syncs.py catches such miscompilations.
        S.mul_(beta2).add_(comm.all_reduce(GU.mT @ GU).mul_(1.0 - beta2))
        shared = comm.replicate(S)
        if shared is not S:  # one process: the identity (a self-copy would confuse torch.compile)
            S.copy_(shared)
    V.mul_(beta2).addcmul_(GU, GU, value=1.0 - beta2)


def combine(
    X: Tensor,
    U: Tensor,
    V: Tensor,
    *,
    t: int,
    m: int,
    n: int,
    beta2: float,
    eps: float,
    gamma: float,
    ns_steps: int,
    ns_dtype: torch.dtype,
    comm: Comm,
    newton_schulz: Callable[..., Tensor] = F.newton_schulz,
    products: F.Products = F.FLOAT32_PRODUCTS,
) -> Tensor:
    """The combination half of a step: Adam on ``X``'s coordinates in ``span(U)``, Newton-Schulz
    on the residual, ``A + gamma sqrt(mn) B`` rescaled to per-entry RMS 1. ``X`` is consumed."""
    scale = math.sqrt(m * n)
    r = U.size(-1)
    keep_residual = None
    if r > 0:
        Y, R = F.project(X, U, products)  # R = X - Y U^T, orthogonal to U
        # Parts at roundoff level of the whole matrix are zeros in exact arithmetic, and must stay
        # zeros: Newton-Schulz would blow a roundoff residual up to a unit-norm noise matrix, and
        # Adam would divide roundoff by roundoff along directions of U that carry no energy. Both
        # happen whenever the gradient's rank is <= r (a 1 x n matrix, a batch smaller than r).
        # ||X||^2 = sum of Y's column energies + ||R||^2 (R is orthogonal to U): one reduction.
        energies = comm.all_reduce(torch.cat([Y.square().sum(dim=-2, keepdim=True),
                                              torch.linalg.matrix_norm(R, keepdim=True).square()], dim=-1))
        floor = energies.sum(dim=-1, keepdim=True).mul_((_ROUNDOFF * torch.finfo(X.dtype).eps) ** 2)
        keep_residual = energies[..., -1:] > floor  # (b, 1, 1)
        Yd = Y.div_((V / (1.0 - beta2**t)).sqrt_().add_(eps))  # A = Yd U^T
        Yd.mul_(energies[..., :-1] > floor)
    else:
        R = X
    if r == n:
        # span(U) is all of R^n: R is zero but for roundoff, which the normalisation in
        # orthogonalize would blow up to a unit-norm noise matrix.
        Gt = Yd @ U.mT
    else:
        orthogonalizer = functools.partial(F.normalized_orthogonal, steps=ns_steps, dtype=ns_dtype,
                                           newton_schulz=newton_schulz)
        B = comm.orthogonalize(R, orthogonalizer, m=m)  # ||B||_F = 1
        if keep_residual is not None:
            B.mul_(keep_residual)
        if r == 0:
            Gt = B.mul_(gamma * scale)
        elif ns_dtype != X.dtype:
            # In exact arithmetic NS5(R) has the row space of R, orthogonal to U. Low-precision
            # NS amplifies rounding noise in R's r null directions by about a^5 ~ 500 to O(1);
            # we project it out and renormalise (a no-op at full precision), without forming
            # the projection: ||B - B U U^T||^2 = ||B||^2 - ||B U||^2 = 1 - ||B U||^2, and
            # A + c (B - B U U^T) = c B + (Yd - c B U) U^T.
            BU = products.mm(B, U)
            inside = comm.all_reduce(torch.linalg.matrix_norm(BU, keepdim=True).square_())
            c = (gamma * scale) / (1.0 - inside).clamp_min(1e-30).sqrt_()
            Gt = products.addmm(B.mul_(c), Yd.sub_(BU.mul_(c)), U.mT)
        else:
            Gt = products.addmm(B.mul_(gamma * scale), Yd, U.mT)
    norm = comm.all_reduce(torch.linalg.matrix_norm(Gt, keepdim=True).square_()).sqrt_()
    return Gt.mul_(scale / norm.clamp_min(1e-30))


def cosmos_direction(
    G: Tensor,
    M: Tensor,
    U: Tensor,
    S: Tensor,
    V: Tensor,
    *,
    t: int,
    m: int,
    n: int,
    init: bool,
    refresh: bool,
    power_iters: int,
    beta1: float,
    beta2: float,
    eps: float,
    gamma: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: torch.dtype,
    comm: Comm,
    newton_schulz: Callable[..., Tensor] = F.newton_schulz,
    products: F.Products = F.FLOAT32_PRODUCTS,
) -> Tensor:
    """One COSMOS step on a stack of ``b`` matrices: :func:`update_subspace`, then
    :func:`combine` on :func:`momentum_estimate`.

    Updates the state stacks ``M`` (b, m, n), ``U`` (b, n, r), ``S`` (b, r, r), ``V`` (b, m, r) in
    place and returns the update direction ``sqrt(mn) * G~ / ||G~||_F`` with per-entry RMS 1.
    Under FSDP2 the ``m`` rows are this rank's shard; ``m`` and ``n`` are the global sizes, and
    ``comm`` sums partial products over ranks and orthogonalises residuals on their owners.
    """
    M.lerp_(G, 1.0 - beta1)
    update_subspace(G, U, S, V, init=init, refresh=refresh, power_iters=power_iters, beta2=beta2, comm=comm,
                    products=products)
    X = momentum_estimate(G, M, t=t, beta1=beta1, nesterov=nesterov)
    return combine(X, U, V, t=t, m=m, n=n, beta2=beta2, eps=eps, gamma=gamma, ns_steps=ns_steps,
                   ns_dtype=ns_dtype, comm=comm, newton_schulz=newton_schulz, products=products)
