"""Recompute BatchNorm running statistics of an averaged model on data (``swa_utils.update_bn``)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, TypeVar, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from ..algorithms._progress import progress, progress_flag

__all__ = ["update_bn"]

M = TypeVar("M", bound=nn.Module)


def _inputs(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x"):
            if key in batch:
                return batch[key]
        raise TypeError(f"update_bn: a dict batch needs an 'input', 'inputs' or 'x' key, got keys {sorted(batch)}")
    return batch


@torch.no_grad()
def update_bn(model: M, loader: Iterable[Any], /, *,
              device: Optional[Union[str, torch.device]] = None, show_progress: Optional[bool] = None) -> M:
    """Reset and recompute every running-statistics norm layer of ``model`` with one pass over ``loader``.

    The equivalent of ``torch.optim.swa_utils.update_bn``: each BatchNorm (and
    InstanceNorm with ``track_running_stats``) gets the exact mean and variance of
    its inputs over the data (``momentum=None``, a cumulative average), then its
    momentum and the model's train/eval mode are restored.  Use it after averaging,
    since averaged weights make the averaged statistics stale.  If ``loader`` or the
    model raises, the statistics are put back as they were before the call too.

    Args:
        model: the module to update in place.
        loader: yields input tensors, or ``(input, target, ...)`` tuples/lists (the first
            item is fed to the model), or dicts with an ``"input"`` key.
        device: move each input there first (default: leave it).
        show_progress: a tqdm bar over the batches (``None``: only when stderr is a terminal and
            tqdm is installed).

    Returns:
        ``model``, for chaining: ``evaluate(update_bn(average(models), loader))``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``loader`` is not an iterable of batches (a number,
            a string), or ``show_progress`` is not ``True``, ``False`` or ``None``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> data = [torch.randn(8, 2) for _ in range(4)]
    >>> _ = update_bn(net, data)
    >>> int(net[1].num_batches_tracked)
    4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"update_bn: expected an nn.Module as model, got {type(model).__name__}")
    show_progress = progress_flag("update_bn", show_progress)
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes)):
        # checked even where nothing would be read (no norm layer): the call is wrong either way
        raise TypeError(f"update_bn: expected an iterable of batches as loader (a DataLoader, a list of tensors), "
                        f"got {type(loader).__name__}")
    norms = [module for module in model.modules()
             if isinstance(module, _NormBase) and module.track_running_stats and module.running_mean is not None]
    if not norms:
        return model
    momenta = {module: module.momentum for module in norms}
    # put back if the loader or the model raises half-way: the reset must not lose the statistics
    saved = [(module, {name: buffer.clone() for name, buffer in module._buffers.items() if buffer is not None})
             for module in norms]
    hooks = []
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
        if isinstance(module, _InstanceNorm):  # reads momentum=None as 0: weigh the k-th batch 1/k instead
            hooks.append(module.register_forward_pre_hook(_cumulative(module)))
    training = {layer: layer.training for layer in model.modules()}
    model.train()
    try:
        for batch in progress(loader, desc="update_bn", enabled=show_progress):
            inputs = _inputs(batch)
            if device is not None and isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device)
            model(inputs)
    except BaseException:
        for module, buffers in saved:
            for name, value in buffers.items():
                getattr(module, name).copy_(value)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for module, momentum in momenta.items():
            module.momentum = momentum
        for layer, mode in training.items():
            layer.training = mode
    return model


def _cumulative(module: nn.Module) -> Any:
    """A forward pre-hook giving the k-th batch through ``module`` momentum ``1/k``: a cumulative average,
    what BatchNorm does with ``momentum=None`` (InstanceNorm reads ``None`` as 0 and would keep its reset)."""
    seen = [0]

    def hook(norm: Any, args: Any) -> None:
        seen[0] += 1
        norm.momentum = 1.0 / seen[0]
    return hook
