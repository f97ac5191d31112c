"""Numerical kernels of COSMOS, each beside the exact slow twin the tests compare it with.

Every kernel works on a *stack* of matrices, shape ``(b, m, n)``, so that matrices of the same
shape are processed by one batched matmul / QR / eigh call instead of one Python iteration each.
All maths is float32 (or the caller's dtype) except the Newton-Schulz iteration, whose compute
dtype is an argument (bfloat16 by default, as is usual for Muon-style optimizers on accelerators).

Notation (nn.Linear layout): ``G`` is ``m x n`` (out x in), ``U`` is ``n x r`` with orthonormal
columns, ``S`` is ``r x r`` and ``V`` is ``m x r``.

The communication seam: kernels that need a sum over row shards (FSDP2 keeps rows of ``G`` on
different ranks) take ``reduce``, a callable that sums a tensor over ranks in place and returns
it. Single-process callers pass nothing and the identity is used.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "NS_COEFFICIENTS",
    "Products",
    "SUBSPACE_DTYPES",
    "addmm",
    "native_bf16_matmul",
    "newton_schulz",
    "polar_factor",
    "stochastic_round_",
    "top_eigenvectors",
    "initial_basis",
    "refresh_basis",
    "refresh_basis_reference",
    "project",
    "normalized_orthogonal",
    "subspace_energy",
    "basis_drift",
]

#: Quintic Newton-Schulz coefficients (a, b, c) of Muon, used by COSMOS for the residual.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

Reduce = Callable[[Tensor], Tensor]
_TINY = 1e-30  # zero-safe divisor: any real norm is many orders larger


def _identity(t: Tensor) -> Tensor:
    return t


def addmm(input: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``beta * input + alpha * (a @ b)`` in one fused call, for matrices or stacks of them."""
    if input.ndim == 2:
        return torch.addmm(input, a, b, beta=beta, alpha=alpha)
    return torch.baddbmm(input, a, b, beta=beta, alpha=alpha)


#: ``subspace_dtype`` values: the input precision of the ``m x n x r`` subspace products.
SUBSPACE_DTYPES = ("float32", "bfloat16", "tf32")


class Products:
    """The ``m x n x r`` products of a COSMOS step (``G U``, ``G^T (G U)``, ``X U``, ``Y U^T``) in
    a chosen input precision, always accumulated and returned in float32 (float64 stays float64).

    * ``"float32"``: plain float32 GEMMs.
    * ``"bfloat16"``: inputs rounded to bf16 (8-bit mantissa), products exact, float32 sums: a
      bf16 tensor-core GEMM with float32 output on CUDA (``out_dtype``), emulated elsewhere.
    * ``"tf32"``: inputs rounded to TF32 (10-bit mantissa), float32 sums: the TF32 tensor cores
      of NVIDIA GPUs (compute capability 8.0 and up) on CUDA, emulated elsewhere. Emulation
      gives the numerics (for measurement), not the speed.

    QR, ``eigh``, the ``r x r`` products of ``S`` and Newton-Schulz are not affected.
    """

    def __init__(self, precision: str = "float32") -> None:
        if precision not in SUBSPACE_DTYPES:
            raise ValueError(f"subspace_dtype must be one of {SUBSPACE_DTYPES}, got {precision!r}")
        self.precision = precision

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.precision == "float32" or a.dtype == torch.float64:
            return a @ b
        if a.device.type == "cuda":
            if self.precision == "tf32":
                with _cuda_tf32():
                    return a @ b
            return _bf16_mm_float32_out(a, b)
        round_ = _round_bf16 if self.precision == "bfloat16" else _round_tf32
        return round_(a) @ round_(b)

    def addmm(self, input: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
        """``beta * input + alpha * (a @ b)``."""
        if self.precision == "float32" or a.dtype == torch.float64:
            return addmm(input, a, b, beta=beta, alpha=alpha)
        product = self.mm(a, b).mul_(alpha)
        return product.add_(input if beta == 1.0 else input * beta)


#: The default: float32 products (the algorithm as specified).
FLOAT32_PRODUCTS = Products("float32")


def _round_tf32(x: Tensor) -> Tensor:
    """float32 -> the nearest TF32 value (10 mantissa bits, ties to even), kept in float32."""
    bits = x.float().contiguous().view(torch.int32)
    lsb = bits.bitwise_right_shift(13).bitwise_and_(1)
    return bits.add(0xFFF).add_(lsb).bitwise_and_(~0x1FFF).view(torch.float32)


class _cuda_tf32:
    def __enter__(self) -> None:
        self._old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._old


def _bf16_mm_float32_out(a: Tensor, b: Tensor) -> Tensor:
    """bf16 inputs, float32 accumulation and output, on CUDA (``out_dtype``, torch >= 2.8)."""
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    try:
        if a16.ndim == 2 and b16.ndim == 2:
            return torch.mm(a16, b16, out_dtype=torch.float32)
        batch = torch.broadcast_shapes(a16.shape[:-2], b16.shape[:-2])
        a3 = a16.expand(*batch, *a16.shape[-2:]).reshape(-1, *a16.shape[-2:])
        b3 = b16.expand(*batch, *b16.shape[-2:]).reshape(-1, *b16.shape[-2:])
        return torch.bmm(a3, b3, out_dtype=torch.float32).reshape(*batch, a16.shape[-2], b16.shape[-1])
    except (TypeError, RuntimeError):  # a torch without out_dtype: bf16 output, rounded once
        return (a16 @ b16).float()


def newton_schulz(
    X: Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> Tensor:
    r"""Approximate the orthogonal polar factor of every matrix in a stack.

    Runs ``steps`` iterations of :math:`X \leftarrow aX + b(XX^\top)X + c(XX^\top)^2X` on the
    orientation whose Gram matrix is the smaller one, after dividing each matrix by its
    Frobenius norm (+ ``eps``), so that all singular values start in (0, 1]. With Muon's
    coefficients the singular values land in roughly [0.7, 1.2] after 5 steps rather than
    exactly at 1: the map is tuned for speed of the small singular values, not for exactness.

    Args:
        X: ``(m, n)`` or ``(b, m, n)``; a zero matrix maps to a zero matrix.
        steps: number of iterations.
        dtype: compute dtype (``torch.bfloat16`` or ``torch.float32``).

    Returns:
        A tensor of the shape and dtype of ``X``.
    """
    if X.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(X.shape)}")
    transpose = X.size(-2) > X.size(-1)
    emulate = dtype == torch.bfloat16 and not native_bf16_matmul(X.device)
    # Row-major in the compute dtype: a transposed view would make every iteration strided.
    Y = (X.mT if transpose else X).to(dtype).contiguous()
    Y = Y / (torch.linalg.matrix_norm(Y, keepdim=True) + eps)
    if emulate:
        # bf16 values, float32 GEMMs rounded to bf16 after each product: the numerics of a bf16
        # GEMM (float32 accumulation, one rounding of the result), at float32 speed on CPUs
        # without bf16 dot products, where a native bf16 GEMM is ~30x slower than float32.
        Y = Y.float()
    iterate = _ns_iterations_emulated if emulate else _ns_iterations
    if Y.ndim == 3 and Y.device.type == "cpu" and Y.size(0) > 1:
        # On CPUs one 2-D GEMM per matrix beats a batched one (measured: 1.4-1.8x for bf16).
        Y = torch.stack([iterate(y, steps, coefficients) for y in Y])
    else:
        Y = iterate(Y, steps, coefficients)
    if transpose:
        Y = Y.mT
    return Y.to(X.dtype)


def _ns_iterations(Y: Tensor, steps: int, coefficients: tuple[float, float, float]) -> Tensor:
    a, b, c = coefficients
    for _ in range(steps):
        A = Y @ Y.mT
        Y = addmm(Y, addmm(A, A, A, beta=b, alpha=c), Y, beta=a)  # aY + (bA + cA^2) Y
    return Y


def _round_bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).float()


def _ns_iterations_emulated(Y: Tensor, steps: int, coefficients: tuple[float, float, float]) -> Tensor:
    a, b, c = coefficients
    for _ in range(steps):
        A = _round_bf16(Y @ Y.mT)
        Y = _round_bf16(addmm(Y, _round_bf16(addmm(A, A, A, beta=b, alpha=c)), Y, beta=a))
    return Y


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_dot() -> bool:
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 GEMMs on ``device`` run on bf16 hardware: accelerators, and CPUs with
    AVX512-BF16 or AMX. Elsewhere (AVX2 CPUs) :func:`newton_schulz` emulates them in float32."""
    return device.type != "cpu" or _cpu_has_bf16_dot()


def stochastic_round_(dst: Tensor, src: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Write float32 ``src`` into bfloat16 ``dst``, rounding each entry up or down at random with
    the probabilities that make the rounding exact in expectation: ``E[dst] = src``.

    A bf16 number keeps the top 16 bits of a float32 one. Adding a uniform random integer in
    ``[0, 2^16)`` to the float32 bit pattern and dropping the low 16 bits rounds the magnitude up
    with probability (discarded bits) / 2^16, for either sign. Round-to-nearest would instead
    drop every change smaller than half a bf16 unit (2^-9 relative): an exponential moving
    average ``m <- b m + (1 - b) g`` with ``1 - b`` near 2^-9 or smaller would stop moving.
    Deterministic for a given ``generator`` state. Returns ``dst``.
    """
    if dst.dtype != torch.bfloat16 or src.dtype != torch.float32:
        raise ValueError(f"stochastic_round_ writes float32 into bfloat16, got {src.dtype} into {dst.dtype}")
    src = src.contiguous()
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    bits = src.view(torch.int32).add(noise).bitwise_and_(-65536)  # -65536 = 0xFFFF0000
    return dst.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero


def polar_factor(X: Tensor) -> Tensor:
    """Exact slow twin of :func:`newton_schulz`'s target: ``U_svd @ Vh_svd`` of each matrix."""
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (U @ Vh).to(X.dtype)


def top_eigenvectors(H: Tensor, r: int) -> Tensor:
    """The ``r`` eigenvectors of the symmetric ``H`` (``(..., n, n)``) with the largest eigenvalues,
    as the columns of an ``(..., n, r)`` tensor, largest first."""
    _, vecs = torch.linalg.eigh(H)
    return vecs[..., -r:].flip(-1) if r > 0 else vecs[..., :0]


def initial_basis(G: Tensor, r: int, reduce: Reduce = _identity) -> Tensor:
    """First-step basis: the top-``r`` eigenvectors of ``G^T G`` for every ``G`` in the stack.

    ``G^T G`` is ``n x n``; it is summed over row shards by ``reduce`` (one all-reduce of n*n on
    the first step only) and dropped when this returns, so no ``n x n`` buffer survives.
    """
    gram = reduce(G.mT @ G)
    return top_eigenvectors(gram, r).contiguous()


def refresh_basis(
    U: Tensor,
    S: Tensor,
    G: Tensor,
    beta2: float,
    power_iters: int = 1,
    reduce: Reduce = _identity,
    replicate: Reduce = _identity,
    products: Products = FLOAT32_PRODUCTS,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Power-iteration refresh of the basis on :math:`H = \beta_2 U S U^\top + (1-\beta_2) G^\top G`.

    One iteration is ``U' = QR(b2 U S + (1-b2) G^T (G U))``; further iterations repeat
    ``U' = QR(H U')``. The projected second moment is carried into the new basis with
    ``T = U^T U'``: ``S' = b2 T^T S T + (1-b2) (G U')^T (G U')`` (= ``U'^T H U'``).
    ``H`` is never formed: every product is ``n x r`` or smaller.

    ``replicate`` makes the final ``U'`` identical on every rank holding rows of ``G`` (a
    broadcast under FSDP2) before ``S'`` and ``G U'`` are formed from it: the QR runs on every
    rank, and its last bits depend on each rank's kernels (MKL's differ with the thread count).

    Returns:
        ``(U', S', G U')`` with ``U'`` contiguous (QR returns a column-major Q).
    """
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    P = U
    for i in range(power_iters):
        gram_P = reduce(products.mm(G.mT, products.mm(G, P)))
        # U^T U = I, so on the first iteration U S (U^T P) = U S.
        SP = S if i == 0 else S @ (U.mT @ P)
        P, _ = torch.linalg.qr(beta2 * (U @ SP) + (1.0 - beta2) * gram_P)
    P = replicate(P.contiguous())
    T = U.mT @ P
    GP = products.mm(G, P)
    S_new = beta2 * (T.mT @ S @ T) + (1.0 - beta2) * reduce(GP.mT @ GP)
    return P, S_new, GP


def refresh_basis_reference(U: Tensor, S: Tensor, G: Tensor, beta2: float, power_iters: int) -> Tensor:
    """Exact slow twin of :func:`refresh_basis`: forms ``H`` (``n x n``) and runs ``power_iters``
    plain power iterations with QR, in float64. With many iterations it converges to the
    top-``r`` eigenvectors of ``H`` (compare with ``top_eigenvectors(H, r)``)."""
    U, S, G = U.double(), S.double(), G.double()
    H = beta2 * U @ S @ U.mT + (1.0 - beta2) * G.mT @ G
    P = U
    for _ in range(power_iters):
        P, _ = torch.linalg.qr(H @ P)
    return P


def project(X: Tensor, U: Tensor, products: Products = FLOAT32_PRODUCTS) -> tuple[Tensor, Tensor]:
    """Split ``X`` into its coordinates in ``span(U)`` and the residual.

    Returns ``(Y, R)`` with ``Y = X U`` (``m x r``) and ``R = X - Y U^T``, orthogonal to ``U``.
    """
    Y = products.mm(X, U)
    return Y, products.addmm(X, Y, U.mT, alpha=-1.0)


def normalized_orthogonal(
    R: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, newton_schulz: Callable[..., Tensor] = newton_schulz
) -> Tensor:
    """``B = NS5(R / ||R||_F); B / ||B||_F`` per matrix of the stack; zero-safe (``R = 0`` gives 0).

    The division by ``||R||_F`` is the one inside :func:`newton_schulz` (by ``||R||_F + 1e-7``),
    as in the authors' code; normalising twice would differ from it by about 1e-7.
    """
    B = newton_schulz(R, steps=steps, dtype=dtype)
    return B / torch.linalg.matrix_norm(B, keepdim=True).clamp_min(_TINY)


def subspace_energy(G: Tensor, U: Tensor) -> Tensor:
    """Share of the gradient energy captured by ``span(U)``: ``||G U||_F^2 / ||G||_F^2`` (0 for G = 0)."""
    captured = (G @ U).square().sum(dim=(-2, -1))
    total = G.square().sum(dim=(-2, -1))
    return captured / total.clamp_min(_TINY)


def basis_drift(U_old: Tensor, U_new: Tensor) -> Tensor:
    """How far a rank-r subspace moved: ``1 - ||U_old^T U_new||_F^2 / r``, in [0, 1] (0: same span)."""
    r = U_old.size(-1)
    if r == 0:
        return torch.zeros(U_old.shape[:-2], dtype=U_old.dtype, device=U_old.device)
    return 1.0 - (U_old.mT @ U_new).square().sum(dim=(-2, -1)) / r


def update_scale(m: int, n: int) -> float:
    """``sqrt(m n)``: scales a unit-Frobenius-norm matrix to unit per-entry RMS."""
    return math.sqrt(m * n)
