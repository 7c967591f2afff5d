"""Differential fuzz of the core arithmetic against plain per-tensor torch (issue 2, README "Semantics").

Random models (1-6 layers of float16/bfloat16/float32/float64/complex64 parameters, integer
parameters and buffers, non-contiguous and channels_last parameters, zero-size and 0-dim ones, a
tied weight, frozen ``ParamConfig``s, made in or out of ``torch.inference_mode()``) and random
expressions (every operator, reflected and in place, chains such as ``c * (a - b) + a``, ``lerp``,
``clone``) over random scalars (Python and NumPy numbers of every kind, 0-dim tensors of every
dtype, inf, nan, -0.0, huge ints) are evaluated in the four forms (``nf`` on ``nf.params``,
``Particle`` packed and ``pack=False``, ``NytoModule``, ``Swarm`` of 1-3 members) and compared with
the same expression on plain tensors: values, dtypes, devices, shapes, strides, ``requires_grad``,
tied weights, carried integer leaves, frozen parameters, fresh storage, operands left alone.  Where
torch refuses an operand or would change a dtype, every form raises (``TypeError``; ``OverflowError``
for ints past 64 bits; torch's own ``RuntimeError`` for a value it cannot convert) and changes nothing.

What "the same expression on plain tensors" means:

* each operator is the same torch operator on the leaf (``c / t`` is ``Tensor.__rtruediv__``, ``c * t``
  with a 0-dim tensor ``c`` is ``torch.mul(c, t)``, ``t **= c`` is ``t.pow_(c)``); nf has no in-place
  operators (``a += c`` rebinds), and ``nf.div(c, a)`` is ``torch.div(c, t)`` as its docstring says;
* a NumPy scalar is the Python number it holds (``np.complex64(1j)`` included, which torch itself
  would read as 0), as nytorch documents;
* a 0-dim leaf with a 0-dim tensor scalar that would promote it computes in the promoted dtype and is
  cast back (what ``t -= c`` does in place): nytorch keeps every dtype;
* a Swarm broadcasts like tensors: the expression on its stacked ``[P, ...]`` tensors.

Matched bit for bit (NaN where NaN, signed zeros told apart), except where one kernel over a packed
buffer (Particle, NytoModule, Swarm) cannot equal torch's per-tensor kernel because torch's CPU kernels
round differently in the vectorised body and the tail of a tensor: ``**`` and complex ``*`` ``/``
(within a few units of the dtype's precision), and ``lerp`` (the sign of an exact zero).  The README
promises bits for the fused expressions, which the fuzz holds to.  ``NYTORCH_FUZZ_EXAMPLES`` sets the
number of examples per test (default 150: the file runs in about 10 s).
"""
from __future__ import annotations

import contextlib
import operator
import random
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nytorch as nyto
import nytorch.functional as nf

Tensor = torch.Tensor
# the reference's stand-ins for float16 times complex make ComplexHalf tensors, which torch calls experimental
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


# -- random models ------------------------------------------------------------------------------
# A leaf spec: (kind, dtype, shape, layout, requires_grad); kind "param" or "buffer"; layout
# "plain", "t" (a transpose), "cl" (channels_last) or "step" (every other element of a longer tensor).
LeafSpec = tuple[str, torch.dtype, tuple[int, ...], str, bool]


def _values(dtype: torch.dtype, shape: tuple[int, ...], rng: random.Random) -> Tensor:
    """Random values with the occasional inf, nan, -0.0 and 0 (floats), or small ints."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    n = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return (torch.rand(n, generator=g) < 0.5).reshape(shape)
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.randint(-5, 6, (n,), generator=g, dtype=torch.int64).to(dtype).reshape(shape)
    scale = rng.choice([1.0, 1e-3, 50.0])
    real = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if n and rng.random() < 0.5:
        for value in rng.sample([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1.0], k=min(n, 3)):
            real[rng.randrange(n)] = value
    if dtype.is_complex:
        imag = torch.randn(n, generator=g, dtype=torch.float64)
        return torch.complex(real, imag).to(dtype).reshape(shape)
    return real.to(dtype).reshape(shape)


def _laid_out(value: Tensor, layout: str) -> Tensor:
    if layout == "t" and value.dim() == 2:
        return value.t().contiguous().t()
    if layout == "cl" and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    if layout == "step" and value.dim() == 1:
        wide = torch.zeros(value.shape[0] * 2, dtype=value.dtype)
        wide[::2] = value
        return wide[::2]
    return value


class Layer(nn.Module):
    def __init__(self, leaves: Sequence[LeafSpec], rng: random.Random) -> None:
        super().__init__()
        for j, (kind, dtype, shape, layout, grad) in enumerate(leaves):
            value = _laid_out(_values(dtype, shape, rng), layout)
            if kind == "param":
                self.register_parameter(f"p{j}", nn.Parameter(value, requires_grad=grad and (
                    dtype.is_floating_point or dtype.is_complex)))
            else:
                self.register_buffer(f"b{j}", value)

    def forward(self, x: Tensor) -> Tensor:
        return x


def _build(self: nn.Module, spec: tuple, seed: int) -> None:
    layers, tie = spec
    rng = random.Random(seed)
    self.layers = nn.ModuleList([Layer(leaves, rng) for leaves in layers])
    if tie is not None:  # a Parameter held by two modules: results keep it tied
        self.tie = nn.Module()
        self.tie.w = getattr(self.layers[tie[0]], f"p{tie[1]}")


class Plain(nn.Module):
    def __init__(self, spec: tuple, seed: int) -> None:
        super().__init__()
        _build(self, spec, seed)

    def forward(self, x: Tensor) -> Tensor:
        return x


class Nyto(nyto.NytoModule):
    def __init__(self, spec: tuple, seed: int) -> None:
        super().__init__()
        _build(self, spec, seed)

    def forward(self, x: Tensor) -> Tensor:
        return x


SHAPES = [(), (3,), (0,), (2, 3), (0, 3), (2, 2, 2, 2), (1,), (5,)]


@st.composite
def leaf_specs(draw: Any, swarm: bool = False) -> LeafSpec:
    kind = draw(st.sampled_from(["param"] * 4 + ["buffer"]))
    if kind == "param":
        dtype = draw(st.sampled_from(FLOATS + [torch.int64]))
    else:
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, torch.float32]))
    shape = draw(st.sampled_from(SHAPES))
    layout = "plain" if swarm else draw(st.sampled_from(["plain", "plain", "t", "cl", "step"]))
    return kind, dtype, shape, layout, draw(st.booleans())


@st.composite
def model_specs(draw: Any, swarm: bool = False) -> tuple:
    layers = draw(st.lists(st.lists(leaf_specs(swarm), min_size=1, max_size=3), min_size=1, max_size=6))
    params = [(i, j) for i, leaves in enumerate(layers) for j, leaf in enumerate(leaves) if leaf[0] == "param"]
    tie = draw(st.sampled_from(params)) if params and draw(st.booleans()) else None
    return tuple(tuple(leaves) for leaves in layers), tie


def _freeze(model: nn.Module, names: Sequence[tuple[str, bool]]) -> None:
    for name, clone in names:
        model.set_param_config(operational=False, clone=clone, name=name)


# -- random scalars -------------------------------------------------------------------------------
SCALARS: list[Callable[[], object]] = [
    lambda: 2, lambda: -3, lambda: 0, lambda: 1, lambda: 2**62, lambda: -(2**63), lambda: 2**64 - 1,
    lambda: 2**64, lambda: -(2**63) - 1, lambda: 10**30,
    lambda: 0.5, lambda: -0.9, lambda: 1 / 3, lambda: 0.1, lambda: 1e300, lambda: 1e-300, lambda: 3.0,
    lambda: float("inf"), lambda: float("-inf"), lambda: float("nan"), lambda: -0.0, lambda: 0.0,
    lambda: True, lambda: False, lambda: 1j, lambda: 0.5 + 2j,
    lambda: np.float16(0.3), lambda: np.float32(0.7), lambda: np.float64(1 / 3), lambda: np.float64("nan"),
    lambda: np.int8(-3), lambda: np.int16(300), lambda: np.int32(7), lambda: np.int64(2**40),
    lambda: np.uint8(200), lambda: np.uint16(5), lambda: np.uint32(3), lambda: np.uint64(9),
    lambda: np.uint64(2**63), lambda: np.bool_(True), lambda: np.bool_(False),
    lambda: np.complex64(1 + 1j), lambda: np.complex128(0.5j), lambda: np.longdouble(0.25),
    lambda: torch.tensor(True), lambda: torch.tensor(3, dtype=torch.uint8), lambda: torch.tensor(-2, dtype=torch.int8),
    lambda: torch.tensor(7, dtype=torch.int16), lambda: torch.tensor(5, dtype=torch.int32),
    lambda: torch.tensor(2**40), lambda: torch.tensor(0.3, dtype=torch.float16),
    lambda: torch.tensor(0.3, dtype=torch.bfloat16), lambda: torch.tensor(0.3),
    lambda: torch.tensor(1 / 3, dtype=torch.float64), lambda: torch.tensor(float("nan")),
    lambda: torch.tensor(-0.0, dtype=torch.float64), lambda: torch.tensor(float("inf"), dtype=torch.float64),
    lambda: torch.tensor(0.5 + 1j, dtype=torch.complex64), lambda: torch.tensor(2j, dtype=torch.complex128),
    lambda: torch.tensor(0.7, requires_grad=True),
]


# -- expressions ----------------------------------------------------------------------------------
# Each expression is a function of (a, b, c): a and b are values of one structure (models,
# Particles, swarms, nf wrappers or plain tensors), c a scalar.  In-place ones return ``a``.
def _iadd(a: Any, b: Any, c: Any) -> Any:
    a += c
    return a


def _isub(a: Any, b: Any, c: Any) -> Any:
    a -= c
    return a


def _imul(a: Any, b: Any, c: Any) -> Any:
    a *= c
    return a


def _idiv(a: Any, b: Any, c: Any) -> Any:
    a /= c
    return a


def _ipow(a: Any, b: Any, c: Any) -> Any:
    a **= c
    return a


def _iadd_b(a: Any, b: Any, c: Any) -> Any:
    a += b
    return a


def _isub_scaled(a: Any, b: Any, c: Any) -> Any:
    a -= c * b
    return a


def _ilerp(a: Any, b: Any, c: Any) -> Any:
    return a.lerp_(b, c)


EXPRESSIONS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "a+c": lambda a, b, c: a + c, "c+a": lambda a, b, c: c + a,
    "a-c": lambda a, b, c: a - c, "c-a": lambda a, b, c: c - a,
    "a*c": lambda a, b, c: a * c, "c*a": lambda a, b, c: c * a,
    "a/c": lambda a, b, c: a / c, "c/a": lambda a, b, c: c / a,
    "a**c": lambda a, b, c: a ** c, "c**a": lambda a, b, c: c ** a,
    "-a": lambda a, b, c: -a, "a+b": lambda a, b, c: a + b, "a-b": lambda a, b, c: a - b,
    "a*b": lambda a, b, c: a * b, "a/b": lambda a, b, c: a / b, "a**b": lambda a, b, c: a ** b,
    "c*(a-b)+a": lambda a, b, c: c * (a - b) + a, "a-c*b": lambda a, b, c: a - c * b,
    "(a+b)/c": lambda a, b, c: (a + b) / c, "c*a+b": lambda a, b, c: c * a + b,
    "a+b*c": lambda a, b, c: a + b * c, "c*a-b": lambda a, b, c: c * a - b,
    "c*(c*a)": lambda a, b, c: c * (c * a), "(c*a)**2": lambda a, b, c: (c * a) ** 2,
    "c*(a-b)-(b*c)": lambda a, b, c: c * (a - b) - (b * c), "2/(c*a)": lambda a, b, c: 2 / (c * a),
    "lerp": lambda a, b, c: a.lerp(b, c), "+a": lambda a, b, c: +a, "clone": lambda a, b, c: a.clone(),
    "c*a.clone()": lambda a, b, c: c * a.clone(),
    "a+=c": _iadd, "a-=c": _isub, "a*=c": _imul, "a/=c": _idiv, "a**=c": _ipow, "a+=b": _iadd_b,
    "a-=c*b": _isub_scaled, "lerp_": _ilerp,
}
INPLACE = {name for name in EXPRESSIONS if "=" in name or name == "lerp_"}


# -- the per-tensor reference ----------------------------------------------------------------------
class DtypeChange(Exception):
    """Per-tensor torch would give a leaf another dtype: nytorch raises ``TypeError`` instead."""


def _plain_scalar(c: object) -> object:
    """How nytorch reads a scalar: a NumPy one as the Python number it holds (documented in ``check_scalar``).

    A NumPy uint64 past int64 is no scalar to torch (``t * np.uint64(2**63)`` gives a NumPy array).
    """
    if isinstance(c, np.uint64) and int(c) >= 1 << 63:
        raise TypeError("torch takes no NumPy uint64 past int64 as a scalar")
    return c.item() if isinstance(c, np.generic) else c


class Ref:
    """One leaf in plain torch: each operator is the same torch operator on the tensor.

    ``nf_div``: ``number / leaf`` is ``torch.div(number, leaf)`` (``nf.div``), not ``Tensor.__rtruediv__``.
    A result of another dtype than the leaf raises ``DtypeChange``, judged on a 1-element stand-in
    for 0-dim leaves (where torch promotes a 0-dim pair, the value is cast back: see the module docstring).
    """

    __array_ufunc__ = None  # NumPy scalars defer to the reflected operators, as they do to tensors

    def __init__(self, t: Tensor, nf_div: bool = False) -> None:
        self.t, self.nf_div = t, nf_div

    def _do(self, fn: Callable[..., Tensor], *others: object) -> "Ref":
        x = self.t
        args = [o.t if isinstance(o, Ref) else _plain_scalar(o) for o in others]
        if x.dim() == 0:
            probe = fn(x.reshape(1), *[a.reshape(1) if isinstance(o, Ref) else a  # type: ignore[union-attr]
                                       for a, o in zip(args, others)])
            if probe.dtype != x.dtype:
                raise DtypeChange(probe.dtype)
        out = fn(x, *args)
        if out.dtype != x.dtype:
            if x.dim() != 0:
                raise DtypeChange(out.dtype)
            out = out.to(x.dtype)
        return type(self)(out, self.nf_div)

    def __add__(self, o: object) -> "Ref": return self._do(operator.add, o)
    def __radd__(self, o: object) -> "Ref": return self._do(lambda x, y: y + x, o)
    def __sub__(self, o: object) -> "Ref": return self._do(operator.sub, o)
    def __rsub__(self, o: object) -> "Ref": return self._do(lambda x, y: y - x, o)
    def __mul__(self, o: object) -> "Ref": return self._do(operator.mul, o)
    def __rmul__(self, o: object) -> "Ref": return self._do(lambda x, y: y * x, o)
    def __truediv__(self, o: object) -> "Ref": return self._do(operator.truediv, o)
    def __pow__(self, o: object) -> "Ref": return self._do(operator.pow, o)
    def __rpow__(self, o: object) -> "Ref": return self._do(lambda x, y: y ** x, o)
    def __neg__(self) -> "Ref": return self._do(operator.neg)
    def __pos__(self) -> "Ref": return self._do(Tensor.clone)
    def clone(self) -> "Ref": return self._do(Tensor.clone)

    def __rtruediv__(self, o: object) -> "Ref":
        return self._do((lambda x, y: torch.div(y, x)) if self.nf_div else (lambda x, y: y / x), o)

    def lerp(self, end: object, weight: object) -> "Ref":
        return self._do(torch.lerp, end, weight)

    lerp_ = lerp


class RefInPlace(Ref):
    """``Ref`` whose in-place operators are torch's in-place ones (``t **= 1e-300`` on float32 is
    ``t.pow_(1e-300)``, which reads the exponent as 0, where ``t ** 1e-300`` does not); for the forms
    that have in-place operators (nf has none: there ``a += c`` rebinds ``a``)."""

    def _do_(self, method: Callable[..., Tensor], fn: Callable[..., Tensor], *others: object) -> "RefInPlace":
        self._do(fn, *others)  # torch's refusals and dtype changes, as out of place
        method(self.t, *[o.t if isinstance(o, Ref) else _plain_scalar(o) for o in others])
        return self

    def __iadd__(self, o: object) -> "RefInPlace": return self._do_(Tensor.add_, operator.add, o)
    def __isub__(self, o: object) -> "RefInPlace": return self._do_(Tensor.sub_, operator.sub, o)
    def __imul__(self, o: object) -> "RefInPlace": return self._do_(Tensor.mul_, operator.mul, o)
    def __itruediv__(self, o: object) -> "RefInPlace": return self._do_(Tensor.div_, operator.truediv, o)
    def __ipow__(self, o: object) -> "RefInPlace": return self._do_(Tensor.pow_, operator.pow, o)

    def lerp_(self, end: object, weight: object) -> "RefInPlace":  # type: ignore[override]
        return self._do_(Tensor.lerp_, torch.lerp, end, weight)


# -- the nf form: a thin wrapper that spells each operator as the nf function ------------------------
class NF:
    """A pytree whose operators are ``nf.add``, ``nf.sub``, ... (nf has no in-place forms: ``a += c`` rebinds)."""

    __array_ufunc__ = None

    def __init__(self, tree: Any) -> None:
        self.tree = tree

    @staticmethod
    def _u(x: object) -> object:
        return x.tree if isinstance(x, NF) else x

    def __add__(self, o: object) -> "NF": return NF(nf.add(self.tree, self._u(o)))
    def __radd__(self, o: object) -> "NF": return NF(nf.add(o, self.tree))
    def __sub__(self, o: object) -> "NF": return NF(nf.sub(self.tree, self._u(o)))
    def __rsub__(self, o: object) -> "NF": return NF(nf.sub(o, self.tree))
    def __mul__(self, o: object) -> "NF": return NF(nf.mul(self.tree, self._u(o)))
    def __rmul__(self, o: object) -> "NF": return NF(nf.mul(o, self.tree))
    def __truediv__(self, o: object) -> "NF": return NF(nf.div(self.tree, self._u(o)))
    def __rtruediv__(self, o: object) -> "NF": return NF(nf.div(o, self.tree))
    def __pow__(self, o: object) -> "NF": return NF(nf.pow(self.tree, self._u(o)))
    def __rpow__(self, o: object) -> "NF": return NF(nf.pow(o, self.tree))
    def __neg__(self) -> "NF": return NF(nf.neg(self.tree))
    def __pos__(self) -> "NF": return NF(nf.clone(self.tree))
    def clone(self) -> "NF": return NF(nf.clone(self.tree))

    def lerp(self, end: "NF", weight: object) -> "NF":
        return NF(nf.lerp(self.tree, end.tree, weight))

    lerp_ = lerp


# -- comparing -----------------------------------------------------------------------------------------
def same_bits(x: Tensor, y: Tensor, signed_zeros: bool = True) -> bool:
    """Equal values, bit for bit up to NaN payloads: NaN where NaN, signed zeros told apart (``signed_zeros``)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    if x.is_complex():
        x, y = torch.view_as_real(x.contiguous()), torch.view_as_real(y.contiguous())
    if not x.is_floating_point():
        return torch.equal(x, y)
    nan_x, nan_y = torch.isnan(x), torch.isnan(y)
    if not torch.equal(nan_x, nan_y):
        return False
    x, y = x[~nan_x], y[~nan_y]
    return torch.equal(x, y) and (not signed_zeros or torch.equal(torch.signbit(x), torch.signbit(y)))


def _snapshot(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, int]]:
    """Per name: the tensor object, a copy of its values and its version counter."""
    return {k: (v, v.detach().clone(), -1 if v.is_inference() else v._version) for k, v in tensors.items()}


def _unchanged(before: dict[str, tuple[Tensor, Tensor, int]], now: dict[str, Tensor], what: str) -> None:
    assert list(now) == list(before), what
    for k, (obj, values, version) in before.items():
        assert now[k] is obj, f"{what}: {k} is another object"
        assert same_bits(now[k].detach(), values), f"{what}: {k} changed"
        assert now[k].is_inference() or now[k]._version == version, f"{what}: {k} version bumped"


def _module_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **{f"buffer:{k}": v for k, v in model.named_buffers()}}


def _mode(inference: bool) -> Any:
    """``torch.inference_mode()``, or nothing (``inference_mode(False)`` would turn grad mode on)."""
    return torch.inference_mode() if inference else contextlib.nullcontext()


def _active(leaf: Tensor, name: str, frozen: dict[str, bool]) -> bool:
    return (leaf.is_floating_point() or leaf.is_complex()) and name not in frozen


def _copy(leaf: Tensor) -> Tensor:
    """A copy with the very strides of ``leaf`` (``clone`` makes a stepped view contiguous): torch's
    kernels for complex ``**`` round differently over contiguous and strided memory."""
    return torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype).copy_(leaf)


def _reference(expr: str, a: dict[str, Tensor], b: dict[str, Tensor], c: object, active: dict[str, bool],
               nf_div: bool) -> tuple[Optional[BaseException], dict[str, Tensor]]:
    """The expression leaf by leaf in plain torch: ``(error, {})`` where some leaf raises or changes dtype."""
    out: dict[str, Tensor] = {}
    for name, leaf in a.items():
        if not active[name]:
            out[name] = leaf.clone()  # carried as a copy
            continue
        kind = Ref if nf_div else RefInPlace  # nf_div: the nf form, which has no in-place operators
        try:
            result = EXPRESSIONS[expr](kind(_copy(leaf), nf_div), kind(_copy(b[name]), nf_div), c)
        except Exception as error:  # noqa: BLE001 - any refusal of torch's is a refusal
            return error, {}
        out[name] = result.t
    return None, out


def _expected_error(c: object, error: Optional[BaseException]) -> tuple[type[BaseException], ...]:
    """The exceptions nytorch may raise where the reference refused (README: TypeError; ints past 64 bits overflow)."""
    if isinstance(c, Tensor) and c.device.type == "meta":
        return (nyto.DeviceMismatchError,)
    if isinstance(c, int) and not isinstance(c, bool) and not (-(1 << 63) <= c < (1 << 64)):
        return (OverflowError,)
    if error is not None and not isinstance(error, (DtypeChange, TypeError)):
        return (TypeError, type(error))  # torch's own refusal of a value (a pow exponent that overflows float16)
    return (TypeError,)


def _scalar_refused_alone(c: object, expr: str) -> bool:
    """Scalars nytorch refuses whatever the leaves (so also with no leaf taking part): ints past 64 bits,
    NumPy uint64 past int64, a boolean to subtract, a 0-dim tensor on another device."""
    if isinstance(c, int) and not isinstance(c, bool) and not (-(1 << 63) <= c < (1 << 64)):
        return True
    if isinstance(c, np.uint64) and int(c) >= 1 << 63:
        return True
    if isinstance(c, Tensor) and c.device.type == "meta":
        return True
    boolean = isinstance(c, (bool, np.bool_)) or (isinstance(c, Tensor) and c.dtype == torch.bool)
    return boolean and expr in ("a-c", "c-a", "a-=c")


def _storages(tensors: Sequence[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


def close(x: Tensor, y: Tensor) -> bool:
    """Equal up to rounding: finite where finite, within a few units of the dtype's precision
    relative to the tensor's largest value (complex products cancel)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    eps = torch.finfo(x.real.dtype).eps if (x.is_floating_point() or x.is_complex()) else 0.0
    if x.is_complex():
        x, y = torch.view_as_real(x.contiguous()), torch.view_as_real(y.contiguous())
    x, y = x.double(), y.double()
    finite_x, finite_y = torch.isfinite(x), torch.isfinite(y)
    if not torch.equal(finite_x, finite_y):
        return False
    x, y = x[finite_x], y[finite_y]
    scale = float(y.abs().max()) if y.numel() else 0.0
    return bool(((x - y).abs() <= 8 * eps * max(scale, 1e-30)).all())


def _exact(form: str, leaf: Tensor, expr: str) -> str:
    """How closely a leaf must match (see the module docstring): ``"bits"``, ``"equal"`` (``torch.equal``,
    NaN-aware: a zero's sign may differ) or ``"close"``."""
    if form in ("nf", "particle_nopack"):
        return "bits"  # per-tensor kernels on the very tensors
    if leaf.is_complex() or "**" in expr:
        return "close"
    return "equal" if "lerp" in expr else "bits"


def _check_leaf(name: str, got: Tensor, want: Tensor, source: Tensor, strides: bool, exact: str = "bits") -> None:
    assert got.dtype == source.dtype and got.device == source.device and got.shape == source.shape, name
    if exact == "close":
        assert close(got.detach(), want.detach()), f"{name}: got {got}, want {want} (up to rounding)"
    else:
        assert same_bits(got.detach(), want.detach(), exact == "bits"), f"{name}: got {got}, want {want}"
    if strides and got.numel() > 1:
        assert got.stride() == want.stride(), f"{name}: strides {got.stride()} vs per-tensor {want.stride()}"


def run_models(form: str, spec: tuple, seeds: tuple[int, int], frozen: dict[str, bool], expr: str, c: object,
               training: bool = True, touch_late: bool = False, inference: bool = False) -> None:
    """One expression in the form ``nf``, ``particle``, ``particle_nopack`` or ``nyto`` against the reference.

    ``frozen``: parameter name -> ``clone`` of a ``ParamConfig(operational=False)`` (on both operands).
    ``touch_late``: change the left operand (values, train/eval) after the operation and before
    anything reads the result (NytoModule results are built on first touch).
    ``inference``: models made and the expression run under ``torch.inference_mode()``; results are
    read outside it (their Parameters are made as inside: README, "Module zoo").
    """
    cls = Nyto if (form == "nyto" or frozen) else Plain
    with _mode(inference):
        ma, mb = cls(spec, seeds[0]), cls(spec, seeds[1])
    for model in (ma, mb):
        _freeze(model, list(frozen.items()))
    ma.train(training)
    if form == "nf":
        A, B = NF(nf.params(ma)), NF(nf.params(mb))
        frozen, touch_late = {}, False  # nf knows nothing of configs; its trees view the models
    elif form.startswith("particle"):
        A, B = nyto.particle(ma, pack=form == "particle"), nyto.particle(mb, pack=form == "particle")
    else:
        A, B = ma, mb
    a_vals = {k: _copy(v.detach()) for k, v in ma.named_parameters()}
    b_vals = {k: _copy(v.detach()) for k, v in mb.named_parameters()}
    a_params = dict(ma.named_parameters())
    active = {k: _active(v, k, frozen) for k, v in a_vals.items()}
    before_a, before_b = _snapshot(_module_tensors(ma)), _snapshot(_module_tensors(mb))
    trees = (_snapshot(A.tree), _snapshot(B.tree)) if form == "nf" else None
    ref_error, want = _reference(expr, a_vals, b_vals, c, active, nf_div=form == "nf")

    try:
        with _mode(inference):
            result = EXPRESSIONS[expr](A, B, c)
    except Exception as error:  # noqa: BLE001 - judged below
        raised: Optional[BaseException] = error
    else:
        raised = None

    inplace = expr in INPLACE and form != "nf"
    if raised is not None:
        allowed = _expected_error(c, ref_error)
        if ref_error is None and (any(active.values()) or not _scalar_refused_alone(c, expr)):
            raise AssertionError(f"{form} {expr} with {c!r} raised but per-tensor torch does not") from raised
        assert isinstance(raised, allowed), f"{form} {expr} with {c!r}: {type(raised).__name__}: {raised}"
        _unchanged(before_a, _module_tensors(ma), "a after an error")
        _unchanged(before_b, _module_tensors(mb), "b after an error")
        if trees is not None:
            _unchanged(trees[0], A.tree, "nf a after an error")
        return
    assert ref_error is None, f"{form} {expr} with {c!r} gave a result where per-tensor torch refuses: {ref_error!r}"

    # the operands' storage now (a NytoModule operand is packed by the operation itself)
    operand_storages = _storages(list(_module_tensors(ma).values()) + list(_module_tensors(mb).values()))
    if touch_late and not inplace:  # the result must hold the values of the time of the operation
        with torch.no_grad(), _mode(inference):
            for p in ma.parameters():
                if p.is_floating_point() or p.is_complex():
                    p.add_(1)
        if form == "nyto":  # and its train/eval mode (a Particle's module() is built when asked)
            ma.train(not training)

    strides = True  # packed models have contiguous leaves, and so have their results
    if form == "nf":
        got = result.tree
        assert list(got) == list(a_vals)
        for name, leaf in got.items():
            _check_leaf(name, leaf, want[name], a_vals[name], strides=True)
            want_grad = active[name] and want[name].requires_grad and not inference
            assert leaf.requires_grad == want_grad, name
        _unchanged(trees[0], A.tree, "nf a")
        _unchanged(trees[1], B.tree, "nf b")
        assert not (_storages(list(got.values())) & _storages(list(A.tree.values()) + list(B.tree.values())))
        return

    if inplace:
        assert result is A
        _check_inplace(ma, a_params, a_vals, want, lambda leaf: _exact(form, leaf, expr))
    else:
        model = result.module() if form.startswith("particle") else result
        if form.startswith("particle"):
            assert list(result.params) == list(a_vals)
            for name, leaf in result.params.items():
                if frozen.get(name) is False:  # the very Parameter: it follows the source
                    assert leaf.data_ptr() == a_params[name].data_ptr() or not leaf.numel(), name
                    continue
                _check_leaf(name, leaf, want[name], a_vals[name], strides, _exact(form, leaf, expr))
        _check_result_model(model, ma, a_params, a_vals, want, frozen, training, strides, operand_storages,
                            lambda leaf: _exact(form, leaf, expr))
        if not touch_late:
            _unchanged(before_a, _module_tensors(ma), "a after an operation")
    _unchanged(before_b, _module_tensors(mb), "b after an operation")


def _check_inplace(ma: nn.Module, a_params: dict[str, Tensor], a_vals: dict[str, Tensor], want: dict[str, Tensor],
                   exact: Callable[[Tensor], str]) -> None:
    now = dict(ma.named_parameters())
    assert list(now) == list(a_params)
    for name, param in now.items():
        assert param is a_params[name], f"{name}: in place must keep the Parameter object"
        _check_leaf(name, param, want[name], a_vals[name], strides=False, exact=exact(param))


def _check_result_model(model: nn.Module, ma: nn.Module, a_params: dict[str, Tensor], a_vals: dict[str, Tensor],
                        want: dict[str, Tensor], frozen: dict[str, bool], training: bool, strides: bool,
                        operand_storages: set[int], exact: Callable[[Tensor], str]) -> None:
    assert type(model) is type(ma)
    assert model.training == training
    got = dict(model.named_parameters())
    assert list(got) == list(a_vals)
    for name, param in got.items():
        source = a_params[name]
        if frozen.get(name) is False:
            assert param is source, f"{name}: a clone=False frozen parameter is the very Parameter"
            continue
        assert isinstance(param, nn.Parameter) and param.is_leaf and param.grad_fn is None, name
        assert param is not source and param.requires_grad == source.requires_grad, name
        _check_leaf(name, param, want[name], a_vals[name], strides, exact(param))
        if param.numel():
            assert param.untyped_storage().data_ptr() not in operand_storages, f"{name} shares an operand's storage"
    if hasattr(model, "tie"):
        assert any(model.tie.w is p for p in got.values()), "a tied Parameter must stay tied"
    for (name, buffer), (_, source) in zip(model.named_buffers(), ma.named_buffers()):
        assert same_bits(buffer, source), name
        if buffer.numel():
            assert buffer.untyped_storage().data_ptr() != source.untyped_storage().data_ptr(), name


def run_swarm(spec: tuple, seeds: Sequence[int], b_kind: str, b_seed: int, expr: str, c: object) -> None:
    """One expression on a ``Swarm`` of ``len(seeds)`` members against the same expression on its stacked
    ``[P, ...]`` tensors (a swarm broadcasts like tensors: README); ``b_kind`` is the other operand:
    a swarm of as many members, a swarm of one, or a (packed or not) Particle of one member."""
    a = nyto.Swarm.stack([Plain(spec, seed) for seed in seeds])
    if b_kind == "swarm":
        b: Any = nyto.Swarm.stack([Plain(spec, b_seed + k) for k in range(len(seeds))])
    elif b_kind == "swarm1":
        b = nyto.Swarm.stack([Plain(spec, b_seed)])
    else:
        b_model = Plain(spec, b_seed)
        b = nyto.particle(b_model, pack=b_kind == "particle")
    b_tensors = (lambda: b.params) if b_kind.startswith("swarm") else (lambda: _module_tensors(b_model))
    a_vals = {k: v.clone() for k, v in a.params.items()}
    b_vals = {k: v.clone() for k, v in b.params.items()}  # a Particle's leaves broadcast as member-shaped tensors
    active = {k: v.is_floating_point() or v.is_complex() for k, v in a_vals.items()}
    before_a, before_buffers = _snapshot(a.params), _snapshot(a.buffers)
    before_b = _snapshot(b_tensors())
    ref_error, want = _reference(expr, a_vals, b_vals, c, active, nf_div=False)
    try:
        result = EXPRESSIONS[expr](a, b, c)
    except Exception as error:  # noqa: BLE001 - judged below
        if ref_error is None and (any(active.values()) or not _scalar_refused_alone(c, expr)):
            raise AssertionError(f"swarm {expr} with {c!r} raised but per-tensor torch does not") from error
        assert isinstance(error, _expected_error(c, ref_error)), f"swarm {expr} with {c!r}: {error!r}"
        _unchanged(before_a, a.params, "swarm a after an error")
        _unchanged(before_buffers, a.buffers, "swarm buffers after an error")
        _unchanged(before_b, b_tensors(), "swarm b after an error")
        return
    assert ref_error is None, f"swarm {expr} with {c!r} gave a result where per-tensor torch refuses: {ref_error!r}"
    if expr in INPLACE:
        assert result is a
    assert isinstance(result, nyto.Swarm) and len(result) == len(seeds)
    assert list(result.params) == list(a_vals)
    for name, leaf in result.params.items():
        _check_leaf(name, leaf, want[name], a_vals[name], strides=False, exact=_exact("swarm", leaf, expr))
    for (name, buffer), (_, (_, source, _)) in zip(result.buffers.items(), before_buffers.items()):
        assert same_bits(buffer, source), name
    _unchanged(before_b, b_tensors(), "swarm b after an operation")
    if expr not in INPLACE:
        _unchanged(before_a, a.params, "swarm a after an operation")


# -- the tests ---------------------------------------------------------------------------------------
FUZZ = settings(max_examples=int(__import__("os").environ.get("NYTORCH_FUZZ_EXAMPLES", "150")), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
scalars = st.sampled_from(range(len(SCALARS))).map(lambda i: SCALARS[i]())
expressions = st.sampled_from(sorted(EXPRESSIONS))
seeds = st.integers(0, 2**16)


@st.composite
def frozen_names(draw: Any, spec: tuple) -> dict[str, bool]:
    model = Plain(spec, 0)
    names = [name for name, _ in model.named_parameters()]
    chosen = draw(st.lists(st.sampled_from(names), max_size=2, unique=True)) if names and draw(st.booleans()) else []
    return {name: draw(st.booleans()) for name in chosen}


@pytest.mark.parametrize("form", ["nf", "particle", "particle_nopack", "nyto"])
@FUZZ
@given(data=st.data(), spec=model_specs(), s1=seeds, s2=seeds, expr=expressions, c=scalars,
       training=st.booleans(), touch_late=st.booleans(), inference=st.sampled_from([False, False, False, True]))
def test_expression_matches_per_tensor_torch(form: str, data: Any, spec: tuple, s1: int, s2: int, expr: str,
                                             c: object, training: bool, touch_late: bool, inference: bool) -> None:
    frozen = data.draw(frozen_names(spec)) if form != "nf" else {}
    run_models(form, spec, (s1, s2), frozen, expr, c, training, touch_late, inference)


@FUZZ
@given(spec=model_specs(swarm=True), seeds_a=st.lists(seeds, min_size=1, max_size=3),
       b_kind=st.sampled_from(["swarm", "swarm1", "particle", "particle_nopack"]), b_seed=seeds,
       expr=expressions, c=scalars)
def test_swarm_expression_matches_stacked_torch(spec: tuple, seeds_a: list[int], b_kind: str, b_seed: int, expr: str,
                                                c: object) -> None:
    run_swarm(spec, seeds_a, b_kind, b_seed, expr, c)


# -- what the fuzz found, pinned down --------------------------------------------------------------------
class Two(nn.Module):
    """float64, float32 and float16 parameters (three buffers when packed), plus a 0-dim float16 one."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = nn.Parameter(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
        self.f = nn.Parameter(torch.rand(5, generator=g) + 0.5)
        self.h = nn.Parameter((torch.rand(7, generator=g) + 0.5).to(dtype))
        self.z = nn.Parameter((torch.rand((), generator=g) + 0.5).to(dtype))


class NytoTwo(nyto.NytoModule):
    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = nn.Parameter(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
        self.f = nn.Parameter(torch.rand(5, generator=g) + 0.5)
        self.h = nn.Parameter((torch.rand(7, generator=g) + 0.5).to(dtype))
        self.z = nn.Parameter((torch.rand((), generator=g) + 0.5).to(dtype))


def _forms(seed: int = 0, dtype: torch.dtype = torch.float16) -> list[tuple[str, nn.Module, Any]]:
    """(name, model, value to operate on) for NytoModule, packed and unpacked Particles."""
    a, b, c = NytoTwo(seed, dtype), Two(seed, dtype), Two(seed, dtype)
    return [("nyto", a, a), ("particle", b, nyto.particle(b)), ("particle_nopack", c, nyto.particle(c, pack=False))]


def _params(value: Any) -> dict[str, Tensor]:
    if isinstance(value, nyto.Particle):
        return value.params
    return {k: v.detach() for k, v in value.named_parameters()}


def test_scaling_a_particle_whose_views_are_out_shares_nothing() -> None:
    """``0.9 * x`` keeps its factor pending and shares ``x``'s buffers (README "Expressions"): not once
    ``x``'s leaves are out (``.params``, ``.module()``), or writes through either reached the other."""
    pa, pb = nyto.particle(nn.Linear(3, 2)), nyto.particle(nn.Linear(3, 2))
    x = pa - pb
    before = x.params["weight"].clone()
    y = 0.9 * x
    x += 1
    assert torch.equal(x.params["weight"], before + 1)  # the in-place update is seen through x's leaves
    assert torch.equal(y.params["weight"], 0.9 * before)
    x = pa - pb
    module = x.module()
    before = module.weight.detach().clone()
    y = 0.5 * x
    with torch.no_grad():
        module.weight.add_(100)  # an optimizer step on the module made from x
    assert torch.equal(y.params["weight"], 0.5 * before)


@pytest.mark.parametrize("scalar", [torch.tensor(0.7), torch.tensor(1 / 3, dtype=torch.float64),
                                    torch.tensor(0.3, dtype=torch.bfloat16)])
def test_zero_dim_leaf_with_a_tensor_scalar_rounds_as_per_tensor(scalar: Tensor) -> None:
    """A 0-dim float16 leaf and a 0-dim tensor of another dtype compute in the promoted dtype per tensor
    (``leaf.sub_(c)``; out of place, cast back): packed buffers and fused in-place kernels did not."""
    for name, model, value in _forms():
        source = _params(value)
        out = _params(value * scalar)
        assert torch.equal(out["z"], (source["z"] * scalar).to(torch.float16)), name
        assert torch.equal(out["h"], source["h"] * scalar), name
        expected = {k: v.clone() for k, v in source.items()}
        for v in expected.values():
            v.sub_(scalar)
        value -= scalar
        for k, v in _params(value).items():
            assert torch.equal(v, expected[k]), (name, k)


@pytest.mark.parametrize("expr, scalar, match", [
    ("pow_", 70000.0, r"pow: the exponent 70000.0 does not fit in float16, so torch cannot apply it to "
                      r"parameter 'h' \(float16\); nothing was changed"),
    ("pow_", 2**62, "pow: the exponent 4611686018427387904 does not fit in float16"),
    ("lerp_", 1e300, r"lerp: the weight 1e\+300 does not fit in float32, so torch cannot apply it to parameter 'f'"),
])
def test_inplace_number_torch_cannot_convert_changes_nothing(expr: str, scalar: float, match: str) -> None:
    """torch refuses ``t.pow_(70000.0)`` on float16 (and a lerp weight past float32) only when it reaches
    that tensor: the float32 parameter, written first, kept its new value (README: in-place operators
    change nothing when they fail)."""
    for name, model, value in _forms(dtype=torch.float16):
        other = NytoTwo(1) if name == "nyto" else Two(1)
        before = _snapshot(dict(model.named_parameters()))
        with pytest.raises(RuntimeError, match=match):
            if expr == "pow_":
                value **= scalar
            else:
                value.lerp_(other, scalar)
        _unchanged(before, dict(model.named_parameters()), name)
    swarm = nyto.Swarm.stack([Two(0), Two(1)])
    before = _snapshot(swarm.params)
    # a Swarm names the method called (``lerp_``), as its other lerp_ errors do
    with pytest.raises(RuntimeError, match=match.replace("lerp:", "lerp_:")):
        if expr == "pow_":
            swarm **= scalar
        else:
            swarm.lerp_(swarm[0], scalar)
    _unchanged(before, swarm.params, "swarm")
    # out of place, torch's own refusal (as per tensor) and nothing changes either
    for name, model, value in _forms(dtype=torch.float16):
        with pytest.raises(RuntimeError, match="without overflow"):
            _ = value ** scalar if expr == "pow_" else value.lerp(value.clone(), scalar)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_scalar_on_the_left_rounds_as_the_operator(dtype: torch.dtype) -> None:
    """``c * t`` with a 0-dim float32 ``c`` rounds ``c`` to float16 first (``torch.mul(c, t)``), ``t * c``
    does not: ``c * model`` now computes ``c * leaf`` in every form, as ``c / model`` computes ``c / leaf``."""
    c = torch.tensor(0.7)
    for name, model, value in _forms(seed=3, dtype=dtype):
        source = _params(value)
        for k, v in _params(c * value).items():
            assert torch.equal(v, (c * source[k]).to(v.dtype)), (name, k)
        for k, v in _params(c + value).items():
            assert torch.equal(v, (c + source[k]).to(v.dtype)), (name, k)
    tree = {"h": (torch.rand(64) + 0.5).to(dtype), "f": torch.rand(3)}
    for k, v in nf.mul(c, tree).items():
        assert torch.equal(v, c * tree[k]), k
    swarm = nyto.Swarm.stack([Two(0, dtype), Two(1, dtype)])
    for k, v in (c * swarm).params.items():
        assert torch.equal(v, c * swarm.params[k]), k


def test_numpy_complex_scalar_keeps_its_imaginary_part() -> None:
    """torch reads ``np.complex64(1 + 1j)`` as 1 (dropping the imaginary part with a warning); nytorch
    judges it as ``1 + 1j`` (a float model refuses it) and now computes with it too."""
    class C(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1 + 2j, 3j, -1.5], dtype=torch.complex64))

    c, z = np.complex64(1 + 1j), 1 + 1j
    w = C().w.detach()
    results = {
        "nf": nf.mul(nf.params(C()), c)["w"], "nf div": nf.div(nf.params(C()), c)["w"],
        "particle": (nyto.particle(C()) * c).params["w"], "reflected": (c * nyto.particle(C(), pack=False)).params["w"],
        "swarm": (nyto.Swarm.stack([C()]) * c).params["w"][0],
        "lerp": nf.lerp(nf.params(C()), {"w": torch.zeros(3, dtype=torch.complex64)}, np.complex128(0.5j))["w"],
    }
    inplace = nyto.particle(C(), pack=False)
    inplace *= c
    results["in place"] = inplace.params["w"]
    expected = {"nf div": w / z, "lerp": torch.lerp(w, torch.zeros(3, dtype=torch.complex64), 0.5j)}
    for key, got in results.items():
        assert torch.equal(got, expected.get(key, w * z)), key
    with pytest.raises(TypeError, match="would turn parameter 'weight'"):
        nyto.particle(nn.Linear(2, 1)) * c


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unpacked_inplace_multiply_rounds_as_per_tensor(dtype: torch.dtype) -> None:
    """``torch._foreach_mul_(tensors, 0.1)`` rounds 0.1 to float16 first, ``t.mul_(0.1)`` does not:
    an unpacked model's ``*=`` (several float16 leaves, one fused call) differed from per-tensor ``*=``."""
    model = Two(0, dtype)
    expected = {k: v.detach().clone() for k, v in model.named_parameters()}
    for v in expected.values():
        v.mul_(0.1)
    value = nyto.particle(model, pack=False)
    value *= 0.1
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), expected[k]), k


def test_clone_keeps_autograd_and_memory_format_as_tensor_clone() -> None:
    """``nf.clone`` (one ``_foreach_clone`` outside autograd) equals ``tensor.clone()`` leaf by leaf:
    values, strides, ``requires_grad`` and ``grad_fn`` under grad, no grad and inference mode."""
    def tree() -> dict[str, Tensor]:
        return {"cl": torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
                "t": torch.randn(4, 3).t(), "step": torch.randn(10)[::2], "z": torch.tensor(1.5, dtype=torch.float64),
                "i": torch.arange(3), "e": torch.empty(0, 3), "g": torch.randn(3, requires_grad=True),
                "c": torch.randn(2, dtype=torch.complex64), "b": torch.tensor([True, False])}

    for mode in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        source = tree()
        with mode():
            got, want = nf.clone(source), {k: v.clone() for k, v in source.items()}
        for k in source:
            assert same_bits(got[k].detach(), want[k].detach()), k
            assert got[k].stride() == want[k].stride() and got[k].requires_grad == want[k].requires_grad, k
            assert (got[k].grad_fn is None) == (want[k].grad_fn is None), k
            assert got[k].is_inference() == want[k].is_inference(), k
            if got[k].numel():
                assert got[k].data_ptr() != source[k].data_ptr(), k


def test_frozen_real_parameter_takes_no_complex_scalar_check() -> None:
    """A non-operational parameter keeps its dtype whatever the scalar: ``1j * model`` whose operational
    parameters are complex works on the first operation too (before packing it checked every floating leaf)."""
    class Mixed(nyto.NytoModule):
        def __init__(self) -> None:
            super().__init__()
            self.h = nn.Parameter(torch.ones(2, dtype=torch.float16))
            self.c = nn.Parameter(torch.tensor(1 + 1j, dtype=torch.complex64))
            self.d = nn.Parameter(torch.tensor(2j, dtype=torch.complex64))

    model = Mixed()
    model.set_param_config(operational=False, clone=False, name="h")
    result = 1j * model
    assert result.h is model.h
    assert torch.equal(result.c, 1j * model.c.detach()) and torch.equal(result.d, 1j * model.d.detach())
    with pytest.raises(TypeError, match="would turn parameter 'h'"):
        1j * Mixed()


# -- programs: live values, dropped ones (their buffers reused), pending factors, in-place writes ------------
class Big(nn.Module):
    """Large enough (> 256 KiB of float32, plus a float64 buffer group) for results to reuse dead results' buffers."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(260, 260, generator=g))
        self.b = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))
        self.register_buffer("n", torch.tensor(seed))


class NytoBig(nyto.NytoModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(260, 260, generator=g))
        self.b = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))
        self.register_buffer("n", torch.tensor(seed))


STEPS = ["add", "sub", "scale", "fused", "fused_sub", "rdiv", "iadd", "imul", "ilerp", "read", "module", "drop", "clone"]


def _values_of(value: Any) -> dict[str, Tensor]:
    return value.params if isinstance(value, nyto.Particle) else {k: v.detach() for k, v in value.named_parameters()}


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 5, 10))  # each example runs up to 12 steps on 270 KB models
@given(form=st.sampled_from(["particle", "nyto"]),
       steps=st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 5), st.integers(0, 5),
                                st.sampled_from([0.9, -0.5, 2, 1 / 3])), min_size=1, max_size=12))
def test_programs_match_per_tensor_torch(form: str, steps: list[tuple[str, int, int, float]]) -> None:
    """Random programs over live values (results built or not, factors pending, buffers of dropped
    results reused by the next result, in-place writes, modules made from Particles) keep every live
    value equal, bit for bit, to the same program on plain tensors."""
    make = (lambda seed: NytoBig(seed)) if form == "nyto" else (lambda seed: nyto.particle(Big(seed)))
    live: list[tuple[Any, dict[str, Tensor]]] = []
    for seed in (0, 1):
        value = make(seed)
        live.append((value, {k: v.clone() for k, v in _values_of(value).items()}))
    modules: list[tuple[nn.Module, dict[str, Tensor]]] = []
    for step, i, j, c in steps:
        (x, rx), (y, ry) = live[i % len(live)], live[j % len(live)]
        with torch.no_grad():
            if step == "add":
                live.append((x + y, {k: rx[k] + ry[k] for k in rx}))
            elif step == "sub":
                live.append((x - y, {k: rx[k] - ry[k] for k in rx}))
            elif step == "scale":
                live.append((c * x, {k: c * rx[k] for k in rx}))
            elif step == "fused":
                live.append((c * (x - y) + x, {k: c * (rx[k] - ry[k]) + rx[k] for k in rx}))
            elif step == "fused_sub":
                live.append((x - c * y, {k: rx[k] - c * ry[k] for k in rx}))
            elif step == "rdiv":
                live.append((c / x, {k: c / rx[k] for k in rx}))
            elif step == "clone":
                live.append((x.clone(), {k: v.clone() for k, v in rx.items()}))
            elif step == "iadd" and x is not y:
                x += y
                for k in rx:
                    rx[k] += ry[k]
            elif step == "imul":
                x *= c
                for k in rx:
                    rx[k] *= c
            elif step == "ilerp" and x is not y:
                x.lerp_(y, 0.25)
                for k in rx:
                    rx[k].lerp_(ry[k], 0.25)
            elif step == "read":
                for k, v in _values_of(x).items():
                    assert same_bits(v, rx[k]), k
            elif step == "module" and isinstance(x, nyto.Particle):
                module = x.module()  # shares x's storage: it follows x's in-place updates
                modules.append((module, rx))
            elif step == "drop" and len(live) > 2:
                live.pop(i % len(live))
    for value, reference in live:
        for k, v in _values_of(value).items():
            assert same_bits(v, reference[k]), k
    for module, reference in modules:
        for k, v in module.named_parameters():
            assert same_bits(v.detach(), reference[k]), k


def test_zero_dim_leaves_only_with_a_tensor_scalar() -> None:
    """``torch._foreach_sub`` over 0-dim float16 tensors only keeps float16 and rounds the float32 scalar
    first, where ``leaf - scalar`` computes in float32: nf (and unpacked models) now go per leaf there."""
    tree = {"a": torch.tensor(-0.0424, dtype=torch.float16), "b": torch.tensor(0.5, dtype=torch.float16)}
    c = torch.tensor(0.3)
    for fn, expected in ((nf.sub, lambda t: t - c), (nf.add, lambda t: t + c), (nf.mul, lambda t: t * c)):
        for k, v in fn(tree, c).items():
            assert v.dtype == torch.float16 and torch.equal(v, expected(tree[k]).half()), (fn.__name__, k)


@pytest.mark.parametrize("factor", [1e300, -3.5e38])
def test_fused_expression_with_a_factor_beyond_float32(factor: float) -> None:
    """``c * (a - b) + a`` is one ``addcmul`` pass, whose ``value`` torch converts to float32 and refuses
    beyond its range; per tensor ``c * t`` is ``inf``: such factors are now applied by their own pass."""
    for name, model, value in _forms(dtype=torch.float32):  # float16 buffers are never fused (exact_fusion)
        other = NytoTwo(1, torch.float32) if name == "nyto" else nyto.particle(Two(1, torch.float32))
        source, theirs = _params(value), _params(other)
        got = _params(factor * (value - other) + value)
        for k, v in got.items():
            assert same_bits(v, factor * (source[k] - theirs[k]) + source[k]), (name, k)


def _mismatched(spec: tuple, how: str) -> tuple:
    """``spec`` with its first parameter's shape or dtype changed, or one more layer."""
    layers, tie = spec
    if how == "layer":
        return layers + ((("param", torch.float32, (2,), "plain", True),),), tie
    flat = [(i, j) for i, leaves in enumerate(layers) for j, leaf in enumerate(leaves) if leaf[0] == "param"]
    i, j = flat[0]
    kind, dtype, shape, layout, grad = layers[i][j]
    if how == "shape":
        changed: LeafSpec = (kind, dtype, (7, 1), "plain", grad)
    else:
        changed = (kind, torch.float64 if dtype != torch.float64 else torch.float32, shape, layout, grad)
    leaves = layers[i][:j] + (changed,) + layers[i][j + 1:]
    return layers[:i] + (leaves,) + layers[i + 1:], tie


B_EXPRESSIONS = sorted(name for name in EXPRESSIONS if "b" in name or "lerp" in name)


@pytest.mark.parametrize("form", ["nf", "particle", "particle_nopack", "nyto", "swarm"])
@settings(FUZZ, max_examples=max(FUZZ.max_examples // 3, 10))
@given(spec=model_specs(swarm=True).filter(lambda spec: any(leaf[0] == "param" for layer in spec[0] for leaf in layer)),
       how=st.sampled_from(["shape", "dtype", "layer"]), expr=st.sampled_from(B_EXPRESSIONS), c=st.sampled_from([0.5, 2]))
def test_other_structure_raises_and_changes_nothing(form: str, spec: tuple, how: str, expr: str, c: float) -> None:
    """An operand of another structure raises ``StructureError`` naming a parameter, and changes no operand."""
    other = _mismatched(spec, how)
    cls = Nyto if form == "nyto" else Plain
    ma, mb = cls(spec, 0), cls(other, 1)
    if form == "nf":
        a, b = NF(nf.params(ma)), NF(nf.params(mb))
    elif form == "swarm":
        a, b = nyto.Swarm.stack([ma, Plain(spec, 2)]), nyto.particle(mb)
    elif form.startswith("particle"):
        a, b = nyto.particle(ma, pack=form == "particle"), nyto.particle(mb, pack=form == "particle")
    else:
        a, b = ma, mb
    before = (_snapshot(_module_tensors(ma)), _snapshot(_module_tensors(mb)))
    swarm_before = _snapshot(a.params) if form == "swarm" else None
    with pytest.raises(nyto.StructureError, match=r"parameter '[\w.]+'"):
        EXPRESSIONS[expr](a, b, c)
    _unchanged(before[0], _module_tensors(ma), "a")
    _unchanged(before[1], _module_tensors(mb), "b")
    if swarm_before is not None:
        _unchanged(swarm_before, a.params, "swarm")
