"""Extra memory of one operation, as a multiple of the model's parameter bytes.

Bytes are what torch's allocator handed out during the call (``torch.profiler``
with ``profile_memory=True``, summing each op's own allocations): an upper bound
of the peak, exact for a single out-of-place operation.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def allocated_bytes(fn: Callable[[], Any], device: torch.device = torch.device("cpu")) -> int:
    """Bytes allocated by torch while ``fn()`` runs on ``device`` (its result is kept alive until measured).

    On CUDA: the peak of the caching allocator's allocated bytes during the call, above what was
    allocated before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(io.StringIO()):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    del result
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
