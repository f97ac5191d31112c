"""Each numerical kernel against its exact slow twin."""

import pytest
import torch
from _numerics import SAFETY, U32, RandomRounding, newton_schulz_twin, single_thread

from lit_cosmos.core import kernels as F


def _projector(U: torch.Tensor) -> torch.Tensor:
    return U @ U.mT


def _with_gap(m: int, n: int, r: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A random m x n matrix whose top-r singular values are well separated from the rest."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    P, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype))
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype))
    sv = torch.cat([torch.linspace(10, 5, r, dtype=dtype), torch.linspace(1, 0.1, k - r, dtype=dtype)])
    return P @ torch.diag(sv) @ Q.mT


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
def test_newton_schulz_cubic_converges_to_svd_polar_factor(shape):
    # With the classical cubic coefficients the iteration converges to the exact polar factor:
    # this checks orientation handling, normalisation and batching against the SVD twin.
    X = torch.randn(3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = F.newton_schulz(X, steps=60, dtype=torch.float64, coefficients=(1.5, -0.5, 0.0))
    want = F.polar_factor(X)
    assert got.dtype == X.dtype
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_quintic_shares_polar_singular_vectors(shape, dtype):
    # Muon's quintic map X -> U f(S) V^T keeps the singular vectors and moves every singular
    # value into about [0.7, 1.2] after 5 steps. So P^T O = V f(S) V^T with P the exact polar
    # factor is symmetric with eigenvalues in that band: a closed-form check of the output.
    X = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    P = F.polar_factor(X).double()

    def asymmetry(ortho):
        small = P.mT @ ortho if shape[0] >= shape[1] else ortho @ P.mT
        return ((small - small.mT).norm(dim=(-2, -1)) / small.norm(dim=(-2, -1))).max().item()

    O = F.newton_schulz(X, steps=5, dtype=dtype).double()
    # Rounding at `dtype` breaks the symmetry by its own size (measured 5e-7 in float32 and 6e-3
    # in bf16 on an AMD EPYC); the bound is SAFETY times that of float64 twins of the dtype's
    # arithmetic (tests/_numerics.py): ~4e-5 and ~3.5e-2, machine-independent.
    twins = []
    with single_thread():
        for seed in range(4):
            rounding = RandomRounding(U32, seed)
            with rounding:
                twins.append(asymmetry(newton_schulz_twin(rounding)(X.double(), steps=5, dtype=dtype)))
    assert asymmetry(O) < SAFETY * max(twins), (asymmetry(O), twins)
    small = P.mT @ O if shape[0] >= shape[1] else O @ P.mT
    eig = torch.linalg.eigvalsh((small + small.mT) / 2)
    assert eig.min() > 0.6 and eig.max() < 1.25


def test_newton_schulz_zero_and_errors():
    assert torch.equal(F.newton_schulz(torch.zeros(2, 3, 5)), torch.zeros(2, 3, 5))
    assert torch.equal(F.normalized_orthogonal(torch.zeros(1, 4, 6)), torch.zeros(1, 4, 6))
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        F.newton_schulz(torch.zeros(7))


def test_normalized_orthogonal_has_unit_frobenius_norm():
    B = F.normalized_orthogonal(torch.randn(3, 8, 5), dtype=torch.float32)
    torch.testing.assert_close(torch.linalg.matrix_norm(B), torch.ones(3))


@pytest.mark.parametrize("shape", [(30, 12), (8, 20)])
def test_initial_basis_matches_eigh_of_gram(shape):
    r = 4
    G = _with_gap(*shape, r=r).unsqueeze(0)
    U = F.initial_basis(G, r)
    _, vecs = torch.linalg.eigh(G[0].mT @ G[0])
    want = vecs[:, -r:]
    assert U.shape == (1, shape[1], r) and U.is_contiguous()
    torch.testing.assert_close(_projector(U[0]), _projector(want), atol=1e-10, rtol=0)
    torch.testing.assert_close(U[0].mT @ U[0], torch.eye(r, dtype=U.dtype), atol=1e-12, rtol=0)


def test_top_eigenvectors_orders_largest_first_and_rank_zero():
    H = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    U = F.top_eigenvectors(H, 2)
    torch.testing.assert_close(U.abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert F.top_eigenvectors(H, 0).shape == (3, 0)


def _state(n: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(1, n, r, generator=g, dtype=torch.float64))
    A = torch.randn(1, r, r, generator=g, dtype=torch.float64)
    return U, A @ A.mT + 0.1 * torch.eye(r, dtype=torch.float64)


@pytest.mark.parametrize("power_iters", [1, 3])
def test_refresh_basis_matches_explicit_power_iteration(power_iters):
    m, n, r, b2 = 14, 10, 3, 0.9
    U, S = _state(n, r, seed=3)
    G = torch.randn(1, m, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    U_new, S_new, GU = F.refresh_basis(U, S, G, b2, power_iters)
    want = F.refresh_basis_reference(U[0], S[0], G[0], b2, power_iters)
    torch.testing.assert_close(_projector(U_new[0]), _projector(want), atol=1e-10, rtol=0)
    H = b2 * U[0] @ S[0] @ U[0].mT + (1 - b2) * G[0].mT @ G[0]
    torch.testing.assert_close(S_new[0], U_new[0].mT @ H @ U_new[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(GU, G @ U_new)
    assert U_new.is_contiguous()


def test_refresh_basis_converges_to_eigh_of_H():
    m, n, r, b2 = 30, 12, 3, 0.95
    U, S = _state(n, r, seed=5)
    G = _with_gap(m, n, r, seed=6).unsqueeze(0)
    U_new, _, _ = F.refresh_basis(U, S, G, b2, power_iters=200)
    H = b2 * U[0] @ S[0] @ U[0].mT + (1 - b2) * G[0].mT @ G[0]
    want = F.top_eigenvectors(H, r)
    torch.testing.assert_close(_projector(U_new[0]), _projector(want), atol=1e-8, rtol=0)


def test_refresh_basis_rejects_zero_iterations():
    U, S = _state(5, 2, seed=0)
    with pytest.raises(ValueError, match="power_iters must be >= 1, got 0"):
        F.refresh_basis(U, S, torch.randn(1, 4, 5, dtype=torch.float64), 0.9, power_iters=0)


def test_project_residual_is_orthogonal_and_reconstructs():
    U, _ = _state(9, 4, seed=7)
    X = torch.randn(1, 6, 9, dtype=torch.float64)
    Y, R = F.project(X, U)
    torch.testing.assert_close(R @ U, torch.zeros(1, 6, 4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Y @ U.mT + R, X)


def test_subspace_energy_and_drift_closed_forms():
    U, _ = _state(8, 3, seed=8)
    G = torch.randn(2, 5, 8, dtype=torch.float64)
    e = F.subspace_energy(G, U)
    assert e.shape == (2,) and bool(((e >= 0) & (e <= 1)).all())
    full, _ = torch.linalg.qr(torch.randn(1, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(F.subspace_energy(G, full), torch.ones(2, dtype=torch.float64))
    assert float(F.subspace_energy(torch.zeros(1, 5, 8), U.float())) == 0.0
    assert float(F.basis_drift(U, U)) == pytest.approx(0.0, abs=1e-12)
    # flipping signs / rotating inside the span is no drift; an orthogonal span is full drift
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    assert float(F.basis_drift(U, U @ Q)) == pytest.approx(0.0, abs=1e-12)
    assert float(F.basis_drift(full[..., :3], full[..., 3:6])) == pytest.approx(1.0, abs=1e-12)


def test_bf16_gemm_emulation_rounds_like_a_bf16_gemm():
    # Small integers: every product and sum is exact in float32, so a bf16 GEMM (float32
    # accumulation, one rounding of the result) and its emulation must agree bit for bit.
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 9, (5, 7), generator=g).to(torch.bfloat16)
    b = torch.randint(-8, 9, (7, 6), generator=g).to(torch.bfloat16)
    c = torch.randint(-8, 9, (5, 6), generator=g).to(torch.bfloat16)
    assert torch.equal(F._round_bf16(a.float() @ b.float()), (a @ b).float())
    native = torch.addmm(c, a, b, beta=3.4445, alpha=-4.775).float()
    emulated = F._round_bf16(torch.addmm(c.float(), a.float(), b.float(), beta=3.4445, alpha=-4.775))
    assert torch.equal(native, emulated)


def test_emulated_bf16_newton_schulz_is_as_accurate_as_native(monkeypatch):
    X = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    exact = F.newton_schulz(X, dtype=torch.float32)
    monkeypatch.setattr(F, "native_bf16_matmul", lambda device: True)
    native = F.newton_schulz(X, dtype=torch.bfloat16)
    monkeypatch.setattr(F, "native_bf16_matmul", lambda device: False)
    emulated = F.newton_schulz(X, dtype=torch.bfloat16)
    assert emulated.dtype == X.dtype
    rel = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    # Both are bf16 iterations that round at the same points (only the accumulation order inside
    # a product differs): their distance from the float32 iteration is the same bf16 error, a few
    # units of 2^-8 amplified by the iteration, so neither may be much worse than the other.
    assert rel(emulated) <= 2 * rel(native) + 4 * 2.0**-8, (rel(emulated), rel(native))
    assert rel(native) <= 2 * rel(emulated) + 4 * 2.0**-8, (rel(emulated), rel(native))


def test_low_precision_products_round_only_their_inputs():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 9, generator=g), torch.randn(3, 9, 5, generator=g)
    # Inputs already representable in the input precision: the product is the float32 one.
    for precision, round_ in (("bfloat16", F._round_bf16), ("tf32", F._round_tf32)):
        products = F.Products(precision)
        a_r, b_r = round_(a), round_(b)
        assert torch.equal(products.mm(a_r, b_r), a_r @ b_r)
        assert products.mm(a, b).dtype == torch.float32
        c = torch.randn(3, 6, 5, generator=g)
        got, want = products.addmm(c, a_r, b_r, beta=0.5, alpha=-2.0), 0.5 * c - 2.0 * (a_r @ b_r)
        # Two float32 evaluations of the same sums of k = 9 exact products: each within
        # gamma_(k+2) (|alpha| |a| |b| + |beta| |c|) entrywise, so apart by twice that; a kernel
        # that rounded its output would be off by up to 2^-8 (bf16) or 2^-11 (TF32) of it.
        bound = 2 * 11 * U32 * (2.0 * (a_r.abs() @ b_r.abs()) + 0.5 * c.abs())
        assert bool(((got - want).abs() <= bound).all())
    with pytest.raises(ValueError, match="subspace_dtype must be one of"):
        F.Products("float16")


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest_even():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    t = F._round_tf32(x)
    assert torch.equal(t.view(torch.int32) & 0x1FFF, torch.zeros_like(t.view(torch.int32)))
    assert ((t - x).abs() <= 2.0**-11 * x.abs()).all()  # half a unit of a 10-bit mantissa
    one = torch.tensor(1.0)
    ulp = 2.0**-10
    ties = torch.tensor([1.0 + ulp / 2, 1.0 + 1.5 * ulp])  # halfway: to the even neighbour
    assert F._round_tf32(ties).tolist() == [1.0, 1.0 + 2 * ulp]
    assert F._round_tf32(one).item() == 1.0
