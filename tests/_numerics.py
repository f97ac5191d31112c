r"""Error bounds for tests that compare float32 / bfloat16 results with a reference.

A tolerance measured on one CPU holds on that CPU only: the float32 BLAS and LAPACK kernels of
other CPUs (AVX2, AVX-512, ARM; 1 or many threads) sum in other orders and round differently.
The bounds here come instead from the standard model of floating-point arithmetic (Higham,
*Accuracy and Stability of Numerical Algorithms*, ch. 2-3), which every IEEE round-to-nearest
kernel satisfies, whatever its order of operations:

* an elementary operation: ``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``;
* a sum of ``k`` products: ``|fl(A B) - A B| <= gamma_k |A| |B|`` entrywise, ``gamma_k ~ k u``;
* Householder QR and symmetric eigensolvers are backward stable: they return the exact factors
  of an input moved by ``~u`` relative to its norm.

``u`` is the unit roundoff, half the machine epsilon: ``2^-24`` for float32, ``2^-8`` for bfloat16.

:class:`RandomRounding` turns this model into a float64 *twin* of a whole computation (Monte
Carlo arithmetic, D. S. Parker 1997): every arithmetic result is moved by a random error of the
largest size the model allows. The spread of a few seeded twins around the exact float64 run
(:func:`twin_deviation`) is the computation's sensitivity to rounding on its own inputs, with
its conditioning and error amplification included (an eigensolve with a small gap, noise that
Newton-Schulz blows up), and it is the same on every machine because it is float64 and seeded.
A low-precision result must then lie within ``SAFETY`` times that spread of the exact run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "SAFETY",
    "U32",
    "UBF16",
    "RandomRounding",
    "cosmos_twin",
    "float32_decisions",
    "newton_schulz_twin",
    "rel_err",
    "single_thread",
    "twin_deviation",
    "unit_roundoff",
    "use_newton_schulz",
]

aten = torch.ops.aten


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of a floating dtype: half its machine epsilon."""
    return torch.finfo(dtype).eps / 2


U32 = unit_roundoff(torch.float32)  # 2^-24
UBF16 = unit_roundoff(torch.bfloat16)  # 2^-8

#: A low-precision result may deviate from the exact run by this many times the largest twin
#: deviation. The twin errs at the model's worst-case size on every operation, so real kernels,
#: whose rounding errors are smaller and partly cancel, stay below it (measured on an AMD EPYC:
#: 0.1-0.67 of it); the factor 2 covers the sampling of a few seeds and errors correlated across
#: operations, which random signs do not represent.
SAFETY = 2.0


def rel_err(got: Tensor, want: Tensor) -> float:
    """``||got - want||_F / ||want||_F`` in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


# Elementwise arithmetic: one rounding of each output entry (fused ops such as lerp, addcmul and
# addcdiv round a few times, each time at most ``u`` of a term no larger than the output or
# than an input, which for the optimizers tested here are of the output's size).
_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "addcmul", "addcmul_",
    "addcdiv", "addcdiv_", "lerp", "lerp_", "sqrt", "sqrt_", "rsqrt", "reciprocal", "reciprocal_",
    "pow", "pow_", "exp", "log", "tanh",
}
_REDUCTIONS = {"sum", "mean", "linalg_vector_norm"}
_MATMULS = {"mm", "bmm", "addmm", "baddbmm"}
_EXACT_FOREACH = {"_foreach_copy_", "_foreach_zero_", "_foreach_abs", "_foreach_abs_", "_foreach_neg", "_foreach_neg_"}


class RandomRounding(TorchDispatchMode):
    r"""Float64 Monte Carlo twin of a low-precision computation.

    Inside the context every float64 result is moved by the largest error that the standard
    model allows a kernel working at unit roundoff ``u``, with a random sign and size (``xi``
    uniform in [-1, 1], fresh per entry, from the seeded generator):

    * elementwise ops, ``torch._foreach_*`` included: ``x (1 + u_out xi)``;
    * sums (means, norms) of ``k`` terms ``x_i``: ``+ k u_acc xi sum |x_i| + u_out xi' |out|``;
    * ``beta C + alpha A B`` with inner size ``k``: ``+ k u_acc xi (|alpha| |A| |B| + |beta| |C|)
      + u_out xi' |out| + u_out xi'' |alpha A B|``: accumulation, rounding of the output, and
      rounding of ``A B`` by kernels that store it before adding ``beta C``;
    * ``eigh`` and ``qr`` (backward stable): the exact factors of an input moved by ``u_out``
      times its norm (``u ||H||_2 xi`` entrywise, symmetrised, for ``eigh``; ``u ||a_j|| xi`` in
      column ``j`` for ``qr``), the returned vectors then rounded like an elementwise result.

    ``u_acc`` is the precision products accumulate in and ``u_out`` the one results are stored
    in: both ``u`` for float32; bfloat16 GEMMs accumulate in float32 in torch's CPU and GPU
    kernels, with or without native bf16 dot products (``u_acc = 2^-24``, ``u_out = 2^-8``).
    :meth:`precision` switches them for a region (a bf16 Newton-Schulz inside a float32 step).
    Every other op is taken as exact: right for views, copies, comparisons, ``abs``, ``clamp``,
    ``cat``; a twin of code with other arithmetic (``svd``, ``cumsum``, ...) must add it here.
    """

    def __init__(self, u: float, seed: int) -> None:
        super().__init__()
        self.u_out = self.u_acc = u
        self.gen = torch.Generator().manual_seed(seed)
        self.active = True

    @contextlib.contextmanager
    def precision(self, u_out: float, u_acc: float) -> Iterator[None]:
        saved = self.u_out, self.u_acc
        self.u_out, self.u_acc = u_out, u_acc
        try:
            yield
        finally:
            self.u_out, self.u_acc = saved

    @contextlib.contextmanager
    def exact(self) -> Iterator[None]:
        """Suspend the model (for its own arithmetic, when called from code running inside it)."""
        saved, self.active = self.active, False
        try:
            yield
        finally:
            self.active = saved

    def xi(self, like: Tensor) -> Tensor:
        with self.exact():
            return torch.rand(like.shape, generator=self.gen, dtype=torch.float64).mul_(2).sub_(1)

    def perturb(self, x: Tensor, u: float) -> Tensor:
        """``x (1 + u xi)`` in place: ``x`` rounded to a precision of unit roundoff ``u``."""
        with self.exact():
            return x.mul_(self.xi(x).mul_(u).add_(1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.active:
            return func(*args, **kwargs)
        if name == "_linalg_eigh" and args[0].dtype == torch.float64:
            H = args[0]
            E = self.xi(H)
            E = (E + E.mT) / 2
            moved = H + E * (self.u_out * torch.linalg.matrix_norm(H, ord=2, keepdim=True))
            vals, vecs = func(moved, *args[1:], **kwargs)
            return vals, self.perturb(vecs, self.u_out)
        if name == "linalg_qr" and args[0].dtype == torch.float64:
            A = args[0]
            moved = A + self.xi(A) * (self.u_out * torch.linalg.vector_norm(A, dim=-2, keepdim=True))
            Q, R = func(moved, *args[1:], **kwargs)
            return self.perturb(Q, self.u_out), R
        out = func(*args, **kwargs)
        if name.startswith("_foreach_") and name not in _EXACT_FOREACH:
            results = args[0] if name.endswith("_") else out
            for t in results:
                if isinstance(t, Tensor) and t.dtype == torch.float64:
                    self.perturb(t, self.u_out)
            return out
        if not isinstance(out, Tensor) or out.dtype != torch.float64:
            return out
        if name in _ELEMENTWISE:
            return self.perturb(out, self.u_out)
        if name in _REDUCTIONS:
            k = max(1, args[0].numel() // max(1, out.numel()))
            scale = func(args[0].abs(), *args[1:], **kwargs)  # the same sum of |x_i|
            err = self.xi(out).mul_(scale.abs()).mul_(k * self.u_acc)
            return self.perturb(out, self.u_out).add_(err)
        if name in _MATMULS:
            fused = name in ("addmm", "baddbmm")
            C, A, B = args[:3] if fused else (None, *args[:2])
            alpha = abs(float(kwargs.get("alpha", 1.0))) if fused else 1.0
            beta = abs(float(kwargs.get("beta", 1.0))) if fused else 0.0
            k = A.size(-1)
            scale = (A.abs() @ B.abs()).mul_(alpha)
            if fused:
                scale += beta * C.abs()
            err = self.xi(out).mul_(scale).mul_(k * self.u_acc)
            err += self.xi(out).mul_(out.abs()).mul_(self.u_out)
            if fused:
                err += self.xi(out).mul_((A @ B).abs_()).mul_(alpha * self.u_out)
            return out.add_(err)
        return out


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread, for float64 twins of tiny problems: their results do not depend on it
    (float64 roundoff is ~1e-16, far below the float32 errors they model), and OpenMP threads on
    matrices this small only cost time, ten times over on a busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def float32_decisions() -> Iterator[None]:
    """Make a float64 twin of a float32 COSMOS run take the float32 run's roundoff decisions.

    COSMOS zeroes parts of the update below ``_ROUNDOFF`` machine epsilons of the matrix's norm
    (lit_cosmos/core/direction.py), with the epsilon of the compute dtype. The twin must use
    float32's: its modelled float32 roundoff would pass float64's floor and be blown up to unit
    norm by Newton-Schulz, which the float32 run never does.
    """
    from lit_cosmos.core import direction

    saved = direction._ROUNDOFF
    direction._ROUNDOFF = saved * torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps
    try:
        yield
    finally:
        direction._ROUNDOFF = saved


Coefficients = tuple[float, float, float]


def newton_schulz_twin(rounding: RandomRounding | None, coefficients: Coefficients | None = None) -> Callable:
    """A float64 Newton-Schulz written from the spec, for twins of lit_cosmos's ``newton_schulz``.

    Normalise by the Frobenius norm (+ ``eps``), then ``steps`` times ``X <- a X + (b A + c A^2) X``
    with ``A = X X^T`` (two fused multiply-adds) on the orientation whose Gram matrix is the
    smaller one. Asked for bfloat16 it rounds its input and every stored result at ``2^-8``
    (products still accumulate in float32, as in torch's bf16 GEMMs); asked for another dtype it
    keeps the precision of ``rounding``; with ``rounding=None`` it is exact whatever it is asked.
    ``coefficients`` replaces the caller's when given. It shares no code with the library, so
    that a broken kernel is not its own yardstick.
    """
    fixed = coefficients

    def newton_schulz(X: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                      coefficients: Coefficients = (3.4445, -4.7750, 2.0315), eps: float = 1e-7) -> Tensor:
        a, b, c = fixed or coefficients
        low = dtype == torch.bfloat16 and rounding is not None
        with rounding.precision(UBF16, U32) if low else contextlib.nullcontext():
            wide = X.size(-2) > X.size(-1)
            Y = (X.mT if wide else X).clone()
            if low:
                rounding.perturb(Y, UBF16)  # the cast of the input to bf16
            Y = Y / (torch.linalg.matrix_norm(Y, keepdim=True) + eps)
            addmm = torch.addmm if Y.ndim == 2 else torch.baddbmm  # fused, as a GEMM kernel would
            for _ in range(steps):
                A = Y @ Y.mT
                Y = addmm(Y, addmm(A, A, A, beta=b, alpha=c), Y, beta=a)
            return Y.mT if wide else Y

    return newton_schulz


def use_newton_schulz(opt: Any, newton_schulz: Callable) -> None:
    """Make ``opt`` (an uncompiled COSMOS) run its functional core with ``newton_schulz``, failing
    loudly if the class no longer calls the core where this expects (a silent miss would leave
    the twin running the library's own low-precision kernel)."""
    from lit_cosmos.core.direction import cosmos_direction

    if getattr(opt, "_direction", None) is not cosmos_direction:
        raise TypeError("COSMOS no longer calls cosmos_direction through ._direction: update tests/_numerics.py")
    opt._direction = functools.partial(cosmos_direction, newton_schulz=newton_schulz)


def cosmos_twin(initial: list[Tensor], grads: list[list[Tensor]], rounding: RandomRounding | None,
                groups: Callable[[list], list] = lambda params: params, **kwargs) -> tuple[list[Tensor], Any]:
    """The float64 twin of a float32 COSMOS run (exact with ``rounding=None``), Newton-Schulz
    included (:func:`newton_schulz_twin`): ``COSMOS(groups(params), **kwargs)`` from ``initial``
    values, one step per entry of ``grads``. Returns the parameters and the optimizer."""
    from lit_cosmos import COSMOS

    def rnd(x: Tensor) -> Tensor:
        x = x.detach().double().clone()
        return rounding.perturb(x, U32) if rounding is not None else x

    params = [torch.nn.Parameter(rnd(x)) for x in initial]
    opt = COSMOS(groups(params), **kwargs)
    use_newton_schulz(opt, newton_schulz_twin(rounding))
    for step in grads:
        for p, g in zip(params, step):
            p.grad = rnd(g)
        with rounding if rounding is not None else contextlib.nullcontext():
            opt.step()
    return params, opt


def twin_deviation(run: Callable[[RandomRounding | None], list[Tensor]], seeds: Iterable[int] = range(4),
                   u: float = U32) -> list[float]:
    """The rounding-error scale of a float32 computation, from its float64 twin.

    ``run(rounding)`` computes in float64 and returns a list of tensors. Given a
    :class:`RandomRounding` it rounds its float32 inputs with ``rounding.perturb(x, U32)`` and
    runs its arithmetic inside ``with rounding:``; given None it is the exact run. Returns, per
    output, the largest entrywise deviation of the seeded twins from the exact run.
    """
    with single_thread(), float32_decisions():
        exact = run(None)
        twins = [run(RandomRounding(u, seed)) for seed in seeds]
    return [max((t[i] - exact[i]).detach().abs().max().item() for t in twins) for i in range(len(exact))]
