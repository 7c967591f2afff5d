"""Leaf-wise pure functions on any optree pytree of tensors (the functional core).

A tree is anything optree flattens: dicts (``nf.params(model)``), lists, tuples,
nested containers, or a bare tensor.  The second operand of a binary function is
another tree of the same structure or a scalar (a Python number or a 0-dim
tensor).  Integer and bool leaves are carried through unchanged (cloned).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, overload

import optree
import torch

from . import _leafwise as lw
from . import _scalars as scalars
from . import _nocast as nocast
from ._tree_match import (aligned, flatten, is_scalar_operand, leaf_names, leaves_of, matched, mismatch,
                          rebuilt, refuse_lone_tensor)
from ._types import PyTree, Scalar, TreeT

Tensor = torch.Tensor
#: ``torch._foreach_clone``, or ``None`` where this torch lacks it (2.11 does): then ``clone`` runs per leaf.
_FOREACH_CLONE: Optional[Callable[[list[Tensor]], list[Tensor]]] = getattr(torch, "_foreach_clone", None)

__all__ = ["add", "sub", "mul", "div", "pow", "neg", "lerp", "clone", "randn_like", "zeros_like",
           "tree_map", "dot", "norm"]


def _scalar_op(op: lw.Op, fn: str, tree: PyTree, scalar: object, argument: str, reflected: bool) -> PyTree:
    leaves, spec = leaves_of(fn, tree, argument)
    active = lw.arithmetic_mask(leaves)
    names = leaf_names(tree, spec is None)
    scalars.check_scalar(fn, scalar, names, leaves, active, reflected=reflected)
    results = lw.apply(lw.reflected_op(lw.REFLECTED[fn], scalar) if reflected else op, leaves, scalar, active=active)
    return rebuilt(tree, spec, results)


def _binary(op: lw.Op, a: PyTree, b: PyTree) -> PyTree:
    fn = op.name
    if is_scalar_operand(a, b):
        if is_scalar_operand(b, a):
            raise TypeError(f"{fn}: expected at least one pytree of tensors, got two scalars {a!r} and {b!r}")
        return _scalar_op(op, fn, b, a, "the second operand", reflected=True)
    if is_scalar_operand(b, a):
        return _scalar_op(op, fn, a, b, "the first operand", reflected=False)
    refuse_lone_tensor(fn, a, b)
    left, right, spec = aligned(fn, a, b)
    return rebuilt(a, spec, lw.apply(op, left, right))


@overload
def add(a: Scalar, b: TreeT, /) -> TreeT: ...
@overload
def add(a: TreeT, b: TreeT | Scalar, /) -> TreeT: ...


def add(a: PyTree | Scalar, b: PyTree | Scalar, /) -> PyTree:
    """Leaf-wise ``a + b`` (``torch.add`` mapped over the tree); ``b`` is a tree or a scalar.

    Args:
        a: a pytree of tensors (or a scalar when ``b`` is a tree).
        b: a pytree of the same structure, or a scalar (Python number or 0-dim tensor).

    Returns:
        A new tree; the inputs are never mutated.

    Raises:
        StructureError: the trees differ in keys, shapes, dtypes or devices (names the leaf).
        TypeError: both operands are scalars, an operand is neither a tree of tensors nor a scalar
            (e.g. a tensor with dimensions against a dict), or a scalar would change a leaf's dtype.
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> import torch
    >>> add({"w": torch.tensor([1., 2.])}, 10)
    {'w': tensor([11., 12.])}
    """
    return _binary(lw.ADD, a, b)


@overload
def sub(a: Scalar, b: TreeT, /) -> TreeT: ...
@overload
def sub(a: TreeT, b: TreeT | Scalar, /) -> TreeT: ...


def sub(a: PyTree | Scalar, b: PyTree | Scalar, /) -> PyTree:
    """Leaf-wise ``a - b``; either side may be a scalar.

    Args:
        a: a pytree of tensors, or a scalar (Python number or 0-dim tensor) when ``b`` is a tree.
        b: a pytree of ``a``'s structure, or a scalar when ``a`` is a tree.

    Returns:
        A new tree of the tree operand's structure; the inputs are never mutated.

    Raises:
        StructureError: the trees differ in keys, shapes, dtypes or devices (names the leaf).
        TypeError: both operands are scalars, an operand is neither a tree of tensors nor a scalar
            (e.g. a tensor with dimensions against a dict), or a scalar would change a leaf's dtype.
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> sub({"w": torch.tensor([1., 2.])}, {"w": torch.tensor([1., 1.])})
    {'w': tensor([0., 1.])}
    >>> sub(1, {"w": torch.tensor([1., 2.])})
    {'w': tensor([ 0., -1.])}
    """
    return _binary(lw.SUB, a, b)


@overload
def mul(a: Scalar, b: TreeT, /) -> TreeT: ...
@overload
def mul(a: TreeT, b: TreeT | Scalar, /) -> TreeT: ...


def mul(a: PyTree | Scalar, b: PyTree | Scalar, /) -> PyTree:
    """Leaf-wise ``a * b``; either side may be a scalar.

    Args:
        a: a pytree of tensors, or a scalar (Python number or 0-dim tensor) when ``b`` is a tree.
        b: a pytree of ``a``'s structure, or a scalar when ``a`` is a tree.

    Returns:
        A new tree of the tree operand's structure; the inputs are never mutated.

    Raises:
        StructureError: the trees differ in keys, shapes, dtypes or devices (names the leaf).
        TypeError: both operands are scalars, an operand is neither a tree of tensors nor a scalar
            (e.g. a tensor with dimensions against a dict), or a scalar would change a leaf's dtype.
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> mul(2, {"w": torch.tensor([1., 2.])})
    {'w': tensor([2., 4.])}
    """
    return _binary(lw.MUL, a, b)


@overload
def div(a: Scalar, b: TreeT, /) -> TreeT: ...
@overload
def div(a: TreeT, b: TreeT | Scalar, /) -> TreeT: ...


def div(a: PyTree | Scalar, b: PyTree | Scalar, /) -> PyTree:
    """Leaf-wise ``a / b`` (true division, IEEE semantics for zeros); either side may be a scalar.

    Each leaf is ``torch.div(a, b)``.  With a number on the left that rounds once, so it can
    differ in the last bit from the ``/`` operator, which torch computes as
    ``b.reciprocal() * a`` (and so do ``number / particle`` and ``number / model``).

    Args:
        a: a pytree of tensors, or a scalar (Python number or 0-dim tensor) when ``b`` is a tree.
        b: a pytree of ``a``'s structure, or a scalar when ``a`` is a tree.

    Returns:
        A new tree of the tree operand's structure; the inputs are never mutated.

    Raises:
        StructureError: the trees differ in keys, shapes, dtypes or devices (names the leaf).
        TypeError: both operands are scalars, an operand is neither a tree of tensors nor a scalar
            (e.g. a tensor with dimensions against a dict), or a scalar would change a leaf's dtype.
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> div({"w": torch.tensor([1., 2.])}, 2)
    {'w': tensor([0.5000, 1.0000])}
    >>> div(2, {"w": torch.tensor([4.])})
    {'w': tensor([0.5000])}
    """
    return _binary(lw.DIV, a, b)


@overload
def pow(a: Scalar, b: TreeT, /) -> TreeT: ...  # noqa: A001 - mirrors torch.pow
@overload
def pow(a: TreeT, b: TreeT | Scalar, /) -> TreeT: ...  # noqa: A001 - mirrors torch.pow


def pow(a: PyTree | Scalar, b: PyTree | Scalar, /) -> PyTree:  # noqa: A001 - mirrors torch.pow
    """Leaf-wise ``a ** b``; either side may be a scalar.

    Args:
        a: a pytree of tensors, or a scalar (Python number or 0-dim tensor) when ``b`` is a tree.
        b: a pytree of ``a``'s structure, or a scalar when ``a`` is a tree.

    Returns:
        A new tree of the tree operand's structure; the inputs are never mutated.

    Raises:
        StructureError: the trees differ in keys, shapes, dtypes or devices (names the leaf).
        TypeError: both operands are scalars, an operand is neither a tree of tensors nor a scalar
            (e.g. a tensor with dimensions against a dict), or a scalar would change a leaf's dtype.
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> pow({"w": torch.tensor([2., 3.])}, 2)
    {'w': tensor([4., 9.])}
    >>> pow(2, {"w": torch.tensor([2., 3.])})
    {'w': tensor([4., 8.])}
    """
    return _binary(lw.POW, a, b)


def neg(a: TreeT, /) -> TreeT:
    """Leaf-wise ``-a``.

    Args:
        a: a pytree of tensors.

    Returns:
        A new tree of ``a``'s structure.

    Raises:
        TypeError: ``a`` is ``None`` or has a leaf that is not a tensor (the message names its path).

    >>> neg({"w": torch.tensor([1., -2.])})
    {'w': tensor([-1.,  2.])}
    """
    leaves, spec = flatten("neg", a, scalar=False)
    return optree.tree_unflatten(spec, lw.apply(lw.NEG, leaves))  # type: ignore[return-value]


def lerp(a: TreeT, b: TreeT, weight: TreeT | Scalar, /) -> TreeT:
    """Leaf-wise ``a + weight * (b - a)`` (``torch.lerp``); ``weight`` is a scalar or a tree.

    ``lerp(target, online, tau)`` is the EMA / Polyak / soft target update.

    Args:
        a: the start, a pytree of tensors.
        b: the end: a pytree of ``a``'s structure, or a scalar (Python number or 0-dim tensor)
            that every leaf moves toward.
        weight: a scalar, or a pytree of ``a``'s structure, shapes and dtypes (one weight per entry).

    Returns:
        A new tree of ``a``'s structure; the inputs are never mutated.

    Raises:
        TypeError: ``a`` is a number, an operand is neither a tree of tensors nor a scalar (e.g. a
            tensor with dimensions against a dict), or a scalar would change a leaf's dtype.
        StructureError: ``b`` or a tree ``weight`` differs from ``a`` in keys, shapes, dtypes or
            devices (names the leaf).
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> lerp({"w": torch.tensor([0., 10.])}, {"w": torch.tensor([10., 20.])}, 0.1)
    {'w': tensor([ 1., 11.])}
    >>> lerp({"w": torch.tensor([0., 10.])}, 20.0, 0.5)  # ``b`` a scalar: every leaf moves toward it
    {'w': tensor([10., 15.])}
    """
    if scalars.is_scalar(a) and not isinstance(a, Tensor):
        raise TypeError(f"lerp: expected a pytree of tensors as the first operand (the start), got the number "
                        f"{a!r}; only the end and the weight may be numbers")
    if is_scalar_operand(b, a):
        b = _filled("lerp", a, b)
    refuse_lone_tensor("lerp", a, b)
    if not is_scalar_operand(weight, a):
        refuse_lone_tensor("lerp", a, weight, "the weight")
        left, right, spec = matched("lerp", a, b)
        _, weights, _ = matched("lerp", a, weight, "the weight")  # the same (flattened) leaf order as ``left``
        return optree.tree_unflatten(spec, lw.apply(lw.LERP, left, right, weights))  # type: ignore[return-value]
    left, right, plain_spec = aligned("lerp", a, b)  # ``None``: two plain dicts, leaves in key order
    names = leaf_names(a, plain_spec is None)
    scalars.check_scalar("lerp", weight, names, left, lw.arithmetic_mask(left))
    return rebuilt(a, plain_spec, lw.apply(lw.LERP, left, right, weight))


def _unary(fn: str, a: PyTree, per_leaf: Callable[[Tensor], Tensor], *, arithmetic_only: bool) -> PyTree:
    # a plain dict in its key order, not optree's sorted one: ``nf.randn_like(nf.params(net))`` draws in
    # ``named_parameters()`` order, so one seed gives the values ``net.randn()`` and ``particle.randn()`` give
    leaves, spec = leaves_of(fn, a, scalar=False)
    return rebuilt(a, spec, [per_leaf(leaf) if (not arithmetic_only or lw.is_arithmetic(leaf)) else leaf.clone()
                             for leaf in leaves])


def clone(a: TreeT, /) -> TreeT:
    """Leaf-wise ``tensor.clone()``: same values, fresh storage (keeps strides and memory format).

    Args:
        a: a pytree of tensors.

    Returns:
        A new tree of ``a``'s structure.

    Raises:
        TypeError: ``a`` is ``None`` or has a leaf that is not a tensor (the message names its path).

    >>> tree = {"w": torch.ones(2)}
    >>> clone(tree)["w"] is tree["w"]
    False
    """
    leaves, spec = flatten("clone", a, scalar=False)
    # one C++ call (autograd and transforms see per leaf); torch 2.11 has no _foreach_clone (pyproject: torch>=2.1)
    if len(leaves) > 1 and _FOREACH_CLONE is not None and not lw.needs_per_leaf(leaves):
        return optree.tree_unflatten(spec, _FOREACH_CLONE(leaves))  # type: ignore[return-value]
    return optree.tree_unflatten(spec, [leaf.clone() for leaf in leaves])  # type: ignore[return-value]


def randn_like(a: TreeT, /) -> TreeT:
    """Leaf-wise ``torch.randn_like``: N(0, 1) values, same shapes, dtypes and devices.

    Integer and bool leaves are carried unchanged.  Reproducible under ``torch.manual_seed``: a
    plain dict (``nf.params(net)``) is drawn in its key order, so one seed gives what ``net.randn()``
    and ``particle(net).randn()`` give; other trees in optree's leaf order.

    Args:
        a: a pytree of tensors.

    Returns:
        A new tree of ``a``'s structure.

    Raises:
        TypeError: ``a`` is ``None`` or has a leaf that is not a tensor (the message names its path).

    >>> _ = torch.manual_seed(0)
    >>> first = randn_like({"w": torch.zeros(3)})
    >>> _ = torch.manual_seed(0)
    >>> torch.equal(first["w"], randn_like({"w": torch.zeros(3)})["w"])
    True
    """
    return _unary("randn_like", a, torch.randn_like, arithmetic_only=True)


def zeros_like(a: TreeT, /) -> TreeT:
    """Leaf-wise ``torch.zeros_like`` (integer and bool leaves are carried unchanged).

    Args:
        a: a pytree of tensors.

    Returns:
        A new tree of ``a``'s structure.

    Raises:
        TypeError: ``a`` is ``None`` or has a leaf that is not a tensor (the message names its path).

    >>> zeros_like({"w": torch.ones(2)})
    {'w': tensor([0., 0.])}
    """
    return _unary("zeros_like", a, torch.zeros_like, arithmetic_only=True)


def tree_map(fn: Callable[..., Any], tree: PyTree, /, *rest: PyTree) -> PyTree:
    """``optree.tree_map`` over tensor leaves: ``fn(leaf, *matching_leaves)`` for every leaf.

    Unlike the arithmetic functions, ``fn`` sees every leaf, integer ones included.

    Args:
        fn: called as ``fn(leaf, *matching_leaves)`` once per leaf of ``tree``.
        tree: a pytree of tensors.
        *rest: pytrees of ``tree``'s structure, or scalars (Python numbers or 0-dim tensors),
            which reach every call as they are.

    Returns:
        A new tree of ``tree``'s structure holding ``fn``'s results.

    Raises:
        StructureError: a tree in ``rest`` has another structure (names the leaf).
        TypeError: a leaf of ``tree`` or of a tree in ``rest`` is not a tensor, or a tensor with
            dimensions is paired with a container (only 0-dim tensors broadcast).

    >>> tree_map(lambda x, y: x * y, {"w": torch.tensor([2.])}, {"w": torch.tensor([3.])})
    {'w': tensor([6.])}
    >>> tree_map(torch.add, {"w": torch.tensor([2.])}, 1.5)  # a scalar reaches every call as it is
    {'w': tensor([3.5000])}
    """
    leaves, spec = flatten("tree_map", tree, scalar=False)
    others: list[Any] = []
    for other in rest:
        if is_scalar_operand(other, tree):
            others.append([other] * len(leaves))
            continue
        refuse_lone_tensor("tree_map", tree, other, "a rest tree")
        other_leaves, other_spec = flatten("tree_map", other, "a rest tree")
        if other_spec != spec:
            raise mismatch("tree_map", tree, other, leaves=False)
        others.append(other_leaves)
    return optree.tree_unflatten(spec, [fn(leaf, *(o[i] for o in others)) for i, leaf in enumerate(leaves)])


def _filled(fn: str, tree: PyTree, scalar: Any) -> PyTree:
    """``tree`` with each arithmetic leaf replaced by ``scalar`` in its dtype, device and shape (expanded).

    A scalar second operand broadcasts like a tree of them; the graph of a ``scalar`` tensor that
    requires grad is kept.
    """
    leaves, spec = leaves_of(fn, tree, "the first operand")
    scalars.check_scalar(fn, scalar, leaf_names(tree, spec is None), leaves, lw.arithmetic_mask(leaves))
    filled = [torch.as_tensor(scalar, dtype=leaf.dtype, device=leaf.device).expand_as(leaf)
              if lw.is_arithmetic(leaf) else leaf for leaf in leaves]  # expanded: no memory per leaf
    return rebuilt(tree, spec, filled)


def _sum_scalars(terms: list[Tensor], like: list[Tensor]) -> Tensor:
    if not terms:
        device = like[0].device if like else None
        return torch.zeros((), device=device)
    total = terms[0]
    for term in terms[1:]:
        if term.device != total.device and "meta" not in (term.device.type, total.device.type):
            term = term.to(total.device)  # a model spread over devices (cuda:0, cuda:1) sums on the first, as norm
        total = total + term
    return total


def dot(a: PyTree, b: PyTree, /) -> Tensor:
    """Sum over leaves of ``(a * b).sum()``: the inner product of two models as one 0-dim tensor.

    Integer leaves are skipped; complex leaves are not conjugated (use ``dot(conj(a), b)``).

    Args:
        a: a pytree of tensors.
        b: a pytree of ``a``'s structure, or a scalar (Python number or 0-dim tensor).

    Returns:
        A 0-dim tensor on the device of ``a``'s first floating (or complex) leaf, as ``norm``
        (``tensor(0.)`` when ``a`` has none).

    Raises:
        StructureError: the trees differ in keys, shapes, dtypes or devices (names the leaf).
        TypeError: an operand is not a tree of tensors or a scalar, or a scalar would change a
            leaf's dtype.
        OverflowError: a Python int scalar does not fit in 64 bits (what torch takes for a scalar).

    >>> dot({"w": torch.tensor([1., 2.]), "b": torch.tensor([3.])},
    ...     {"w": torch.tensor([1., 1.]), "b": torch.tensor([2.])})
    tensor(9.)
    >>> dot({"w": torch.tensor([1., 2.])}, 2.0)  # ``b`` a scalar: 2 * the sum of every leaf
    tensor(6.)
    """
    if is_scalar_operand(b, a):
        b = _filled("dot", a, b)
    refuse_lone_tensor("dot", a, b)
    left, right, _ = matched("dot", a, b)
    pairs = [(x, y) for x, y in zip(left, right) if lw.is_arithmetic(x)]
    return _sum_scalars([torch.sum(x * y) for x, y in pairs], left)


def norm(a: PyTree, /) -> Tensor:
    """The global L2 norm ``sqrt(sum of squares of every leaf)`` as one 0-dim tensor.

    Integer leaves are skipped.  Fused with ``torch._foreach_norm`` outside autograd.

    Args:
        a: a pytree of tensors.

    Returns:
        A 0-dim real tensor on the device of ``a``'s first floating (or complex) leaf
        (``tensor(0.)`` when ``a`` has none, on its first leaf's device).

    Raises:
        TypeError: ``a`` is ``None`` or has a leaf that is not a tensor (the message names its path).

    >>> norm({"w": torch.tensor([3.]), "b": torch.tensor([4.])})
    tensor(5.)
    """
    every = flatten("norm", a, scalar=False)[0]
    leaves = [leaf for leaf in every if lw.is_arithmetic(leaf)]
    if not leaves:  # on the first leaf's device, as dot: not on the default device
        return torch.zeros((), device=every[0].device if every else None)
    if lw.needs_per_leaf(leaves):
        norms = [torch.linalg.vector_norm(leaf) for leaf in leaves]
    else:
        norms = list(torch._foreach_norm(leaves))
    dtype = norms[0].dtype
    for value in norms[1:]:
        dtype = torch.promote_types(dtype, value.dtype)
    device = leaves[0].device
    return torch.linalg.vector_norm(nocast.stack([value.to(device=device, dtype=dtype) for value in norms]))
