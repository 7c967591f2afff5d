"""Flatten pytrees, name their leaves and match two of them, with errors that name the path.

What the functional core (``_tree``) checks before any arithmetic: every leaf a tensor
(``flatten``), two operands of one structure, shapes, dtypes and devices (``matched``,
``aligned``), a scalar operand told from a tree (``is_scalar_operand``), and the first
difference named in the source's own key order (``mismatch``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import optree
import torch

from . import _leafwise as lw
from . import _scalars as scalars
from ._errors import StructureError
from ._types import PyTree

Tensor = torch.Tensor

__all__ = ["path_names", "flatten", "leaves_of", "rebuilt", "mismatch", "matched", "aligned", "is_scalar_operand", "refuse_lone_tensor",
           "plain_leaves", "leaf_names"]


def _path_name(path: Sequence[Any]) -> str:
    return ".".join(str(key) for key in path) if path else "<root>"


def path_names(tree: PyTree) -> list[str]:
    """Leaf paths of ``tree`` as ``state_dict``-style strings, in flattening order.

    >>> import torch
    >>> path_names({"layer": {"weight": torch.ones(1)}, "bias": [torch.ones(1)]})
    ['bias.0', 'layer.weight']
    """
    return [_path_name(path) for path in optree.tree_paths(tree)]


def flatten(fn: str, tree: PyTree, argument: str = "tree", *,
            scalar: bool = True) -> tuple[list[Tensor], optree.PyTreeSpec]:
    """Flatten ``tree`` and check every leaf is a tensor (``scalar``: messages say a scalar is accepted too).

    Raises:
        TypeError: naming the path of the first leaf that is not a tensor.

    >>> leaves, spec = flatten("demo", {"w": torch.ones(2)})
    >>> [tuple(leaf.shape) for leaf in leaves]
    [(2,)]
    """
    expected = "a pytree of tensors or a scalar" if scalar else "a pytree of tensors"
    if tree is None:
        raise TypeError(f"{fn}: expected {expected} as {argument}, got None")
    leaves, spec = optree.tree_flatten(tree)
    if not all(issubclass(kind, Tensor) for kind in set(map(type, leaves))):
        bad = next(i for i, value in enumerate(leaves) if not isinstance(value, Tensor))
        name = path_names(tree)[bad]
        raise TypeError(
            f"{fn}: expected {expected} as {argument}, "
            f"but the leaf at {name!r} is a {type(leaves[bad]).__name__}"
        )
    return leaves, spec


def _in_insertion_order(tree: PyTree) -> PyTree:
    """``tree`` with plain dicts as ``OrderedDict`` (optree keeps their order; plain dicts it sorts)."""
    if isinstance(tree, dict) and type(tree) is dict:
        return OrderedDict((key, _in_insertion_order(value)) for key, value in tree.items())
    if type(tree) in (list, tuple):
        return type(tree)(_in_insertion_order(value) for value in tree)
    return tree


def mismatch(fn: str, a: PyTree, b: PyTree, *, leaves: bool = True, other: str = "the second operand"
              ) -> StructureError:
    """The first difference in ``a``'s own key order (``named_parameters()`` order for ``nf.params``)."""
    ordered_a, ordered_b = _in_insertion_order(a), _in_insertion_order(b)
    names_a, names_b = path_names(ordered_a), path_names(ordered_b)
    leaves_b = dict(zip(names_b, optree.tree_leaves(ordered_b)))
    for name, leaf in zip(names_a, optree.tree_leaves(ordered_a)):
        if name not in leaves_b:
            return StructureError(f"{fn}: parameter {name!r} is missing from {other}")
        if leaves:
            try:
                lw.check_pairs(fn, [name], [leaf], [leaves_b[name]])
            except StructureError as error:
                return error
    known = set(names_a)
    for name in names_b:
        if name not in known:
            return StructureError(f"{fn}: {other} has an extra parameter {name!r}")
    return StructureError(f"{fn}: the operands have different container types "
                          f"({optree.tree_structure(a)} vs {optree.tree_structure(b)})")


def matched(fn: str, a: PyTree, b: PyTree, other: str = "the second operand"
            ) -> tuple[list[Tensor], list[Tensor], optree.PyTreeSpec]:
    """Flatten two trees and check they share structure, shapes, dtypes and devices (``other`` names ``b``)."""
    left, spec = flatten(fn, a, "the first operand")
    right, spec_b = flatten(fn, b, other)
    if spec != spec_b or not lw.same_layout(left, right):
        raise mismatch(fn, a, b, other=other)
    return left, right, spec


def aligned(fn: str, a: PyTree, b: PyTree) -> tuple[list[Tensor], list[Tensor], Optional[optree.PyTreeSpec]]:
    """``matched``, with a short path for two plain dicts of one key order (then the spec is ``None``).

    >>> aligned("demo", {"w": torch.ones(2)}, {"w": torch.zeros(2)})[2] is None
    True
    """
    left, right = plain_leaves(a), plain_leaves(b)
    if left is not None and right is not None and list(a) == list(b):  # same keys, same order
        if not lw.same_layout(left, right):
            raise mismatch(fn, a, b)
        return left, right, None
    return matched(fn, a, b)


def is_scalar_operand(value: object, other: object) -> bool:
    if isinstance(value, Tensor):
        # a 0-dim tensor broadcasts, unless the other side is a 0-dim tensor too (then both are trees)
        return value.dim() == 0 and not (isinstance(other, Tensor) and other.dim() == 0)
    return scalars.is_scalar(value)


def refuse_lone_tensor(fn: str, a: PyTree, b: PyTree, second: str = "the second operand") -> None:
    """``TypeError`` for a tensor with dimensions against a tree of several leaves: it is neither a
    matching tree nor a scalar (only 0-dim tensors broadcast), whatever the shapes inside."""
    for tensor, tree, which in ((b, a, second), (a, b, "the first operand")):
        if isinstance(tensor, Tensor) and not isinstance(tree, Tensor):
            raise TypeError(f"{fn}: expected a pytree like the first operand or a scalar as {which}, "
                            f"got a tensor of shape {tuple(tensor.shape)} (only 0-dim tensors broadcast)")


def plain_leaves(tree: PyTree) -> Optional[list[Tensor]]:
    """The leaves of a plain ``dict`` of tensors (what ``nf.params`` gives), in key order; else ``None``.

    Such a dict needs no pytree machinery: its leaves are its values and its result is
    ``dict(zip(keys, results))`` (same keys, same order), which saves flattening and
    unflattening on every operation.
    """
    if type(tree) is not dict or not tree:
        return None
    leaves = list(tree.values())
    return leaves if all(issubclass(kind, Tensor) for kind in set(map(type, leaves))) else None


def leaves_of(fn: str, tree: PyTree, argument: str = "tree", *,
              scalar: bool = True) -> tuple[list[Tensor], Optional[optree.PyTreeSpec]]:
    """``tree``'s leaves and spec: a plain dict's values in key order and no spec (``plain_leaves``), else ``flatten``'s.

    >>> leaves_of("add", {"b": torch.ones(1), "a": torch.zeros(1)})
    ([tensor([1.]), tensor([0.])], None)
    """
    plain = plain_leaves(tree)
    return (plain, None) if plain is not None else flatten(fn, tree, argument, scalar=scalar)


def rebuilt(tree: PyTree, spec: Optional[optree.PyTreeSpec], leaves: list[Any]) -> PyTree:
    """``leaves`` in ``tree``'s structure: ``tree``'s keys for a plain dict (``spec`` None, see ``leaves_of``
    and ``aligned``), else ``spec`` unflattened.

    >>> rebuilt({"w": 0}, None, [torch.ones(1)])
    {'w': tensor([1.])}
    """
    return dict(zip(tree, leaves)) if spec is None else optree.tree_unflatten(spec, leaves)


def leaf_names(tree: PyTree, plain: bool) -> Callable[[], list[str]]:
    """The names of ``tree``'s leaves in the order its leaves were taken, read only when called.

    A plain dict's leaves are its values in key order (``plain_leaves``); any other tree's are optree's.
    """
    if plain:
        return lambda: [_path_name((key,)) for key in tree]
    return lambda: path_names(tree)
