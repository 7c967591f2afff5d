"""Which modules keep their weights where nytorch cannot see them: ``torch.ao`` quantized modules.

A quantized ``Linear``, ``Conv2d`` or ``Embedding`` (static or dynamic, ``torch.ao.quantization.convert``
or ``quantize_dynamic``) holds its weights packed in a TorchScript object (``_packed_params``), not in
``named_parameters()``: arithmetic, merges and swarms would see no parameters there and give back the
operand's weights unchanged.  ``_walk.Layout`` refuses such modules with ``refusal``'s message.
"""
from __future__ import annotations

import sys
from torch import nn

__all__ = ["CLASSES", "loaded", "quantized", "refusal"]

#: The ``torch.ao`` classes whose modules keep their weights packed, by (module, attribute).  Read from
#: ``sys.modules``, never imported: where torch has not loaded them no instance of them can exist.
_HIDING = (
    ("torch.ao.nn.quantized.modules.utils", "WeightedQuantizedModule"),  # Linear, Conv*, ConvTranspose*, fused
    ("torch.ao.nn.quantized.modules.embedding_ops", "Embedding"),  # and EmbeddingBag
    ("torch.ao.nn.quantized.modules.embedding_ops", "EmbeddingPackedParams"),
    ("torch.ao.nn.quantized.modules.linear", "LinearPackedParams"),
    ("torch.ao.nn.quantized.modules.activation", "PReLU"),  # its weight is a quantized tensor attribute
    ("torch.ao.nn.quantized.dynamic.modules.rnn", "RNNBase"),  # dynamic LSTM, GRU
    ("torch.ao.nn.quantized.dynamic.modules.rnn", "RNNCellBase"),
    ("torch.ao.nn.quantized.dynamic.modules.rnn", "PackedParameter"),
)

#: ``quantized``'s verdict per class (``_walk.Layout`` reads it inline: one dict lookup per module).
#: Cleared when it grows past ``_MOST`` classes (``torch.fx`` and ``parametrize`` make one per instance).
CLASSES: dict[type, bool] = {}
_MOST = 1024


def loaded(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes named ``(module, attribute)`` whose modules torch has loaded; never imports one.

    Where torch has not loaded a module, no instance of its classes can exist, so a check for them
    costs no import.

    >>> [cls.__name__ for cls in loaded((("torch.nn", "Linear"), ("no.such.module", "Thing")))]
    ['Linear']
    """
    found = (getattr(sys.modules.get(name), attribute, None) for name, attribute in names)
    return tuple(cls for cls in found if isinstance(cls, type))


def quantized(cls: type) -> bool:
    """Whether modules of class ``cls`` keep their weights packed outside ``named_parameters()``.

    Args:
        cls: a module class.

    Returns:
        True for ``torch.ao`` quantized modules with weights (and classes derived from them).

    >>> import torch, torch.ao.nn.quantized.dynamic as nnqd
    >>> quantized(nnqd.Linear), quantized(torch.nn.Linear)
    (True, False)
    """
    verdict = CLASSES.get(cls)
    if verdict is None:
        bases = loaded(_HIDING)
        verdict = bool(bases) and issubclass(cls, bases)
        if len(CLASSES) >= _MOST:
            CLASSES.clear()
        CLASSES[cls] = verdict
    return verdict


def refusal(root: nn.Module, prefix: str, module: nn.Module) -> str:
    """The message for a quantized ``module`` found at ``prefix`` (``""`` or ending in ``.``) below ``root``.

    >>> import torch, torch.ao.nn.quantized.dynamic as nnqd
    >>> print(refusal(torch.nn.Sequential(), "0.", nnqd.Linear(2, 2)))  # doctest: +ELLIPSIS
    Sequential: expected modules that keep their weights as parameters, but submodule '0' is a quantized Linear (torch.ao.nn.quantized.dynamic...), ...; quantize the result of the arithmetic, not its operands
    """
    cls = type(module)
    where = f"submodule {prefix.rstrip('.')!r}" if prefix else "the module"
    return (f"{type(root).__name__}: expected modules that keep their weights as parameters, but {where} is a "
            f"quantized {cls.__name__} ({cls.__module__}), which keeps its weights packed outside "
            "named_parameters(): nytorch would see no parameters there, and every result would hold the "
            "operand's weights unchanged; quantize the result of the arithmetic, not its operands")

