"""Distributed model averaging vs its floor: ``all_reduce_mean`` of a 50M-parameter model over 4 processes.

Workload (issue 5): ``nytorch.distributed.all_reduce_mean(model)`` as called by default (handshake,
then the model, packed into one buffer per dtype on its first call, is reduced right there:
no copy), the same with ``pack=False`` (the model keeps one tensor per parameter: its values
are copied into one coalesced buffer and the mean back into the Parameters once every transfer
has succeeded, two extra memory passes), against the floor, one ``torch.distributed.all_reduce``
of a single flat tensor of the same size, and against the naive way, one ``all_reduce`` per
parameter tensor.  Target: within 1.2x of the floor.

Four local gloo processes (CPU; NCCL when CUDA is available) take turns: every sample is
preceded by a barrier and its time is the slowest rank's; implementations alternate inside
one loop and the medians and ratios come from that one run.  ``bytes_per_rank`` is the
payload each rank contributes (the handshake's 64-byte header included for nytorch).

Run: ``python -m benchmarks.bench_distributed [--quick]`` from the repository root
(``--quick``: a ~3M-parameter model).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Row = dict[str, Any]
WORLD = 4
FLOOR = "floor: flat all_reduce"


class Block(nn.Module):
    """A transformer-shaped block: ``12·w²`` weights in 12 tensors (qkv, out, MLP, two LayerNorms)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)


def make_model(quick: bool) -> nn.Module:
    """16 blocks of width 512 (50.4M parameters, 192 tensors), or 4 of width 256 with ``quick`` (3.2M)."""
    blocks, width = (4, 256) if quick else (16, 512)
    with torch.no_grad():
        return nn.Sequential(*(Block(width) for _ in range(blocks)))


def _per_tensor(model: nn.Module) -> None:
    size = dist.get_world_size()
    with torch.no_grad():
        for param in model.parameters():
            dist.all_reduce(param)
            param.div_(size)


def worker(outdir: str, quick: bool, repeats: int) -> None:
    """One rank: time every implementation, interleaved; rank 0 writes the rows."""
    from nytorch import distributed as nd

    rank = int(os.environ["RANK"])
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= WORLD  # NCCL: one GPU per process
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=os.environ["INIT"], rank=rank, world_size=WORLD)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(rank)
    model = make_model(quick).to(device)  # packed by its first all_reduce_mean (the warm-up round)
    unpacked = make_model(quick).to(device)
    numel = sum(p.numel() for p in model.parameters())
    flat = torch.ones(numel, device=device)  # sums stay finite over the repeats
    impls: dict[str, Callable[[], Any]] = {
        FLOOR: lambda: dist.all_reduce(flat),
        "nytorch all_reduce_mean": lambda: nd.all_reduce_mean(model, timeout=600),
        "same, pack=False": lambda: nd.all_reduce_mean(unpacked, timeout=600, pack=False),
        "all_reduce per tensor": lambda: _per_tensor(unpacked),
    }
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for repeat in range(repeats + 1):  # the first round warms up
        order = list(impls.items())
        for name, fn in order if repeat % 2 else order[::-1]:  # alternate who goes first
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            times = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
            dist.all_gather_object(times, elapsed)
            if repeat:
                samples[name].append(max(float(t) for t in times) * 1e6)
    if rank == 0:
        medians = {name: statistics.median(values) for name, values in samples.items()}
        payload = numel * 4
        size = f"{numel / 1e6:.1f}M x{WORLD}"
        rows = [{"workload": "all_reduce_mean", "size": size, "implementation": name,
                 "median_us": round(value, 1), "ratio_to_floor": round(value / medians[FLOOR], 3),
                 "bytes_per_rank": payload + (8 * 8 if name != FLOOR and "per tensor" not in name else 0),
                 "backend": backend, "tensors": len(list(model.parameters()))}
                for name, value in medians.items()]
        Path(outdir, "rows.json").write_text(json.dumps(rows))
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: gloo's threads may still be dropping the last all_gather_object's
    # tensors, which needs the GIL and aborts during shutdown (see nytorch/distributed/_comm.py).
    os._exit(0)


def run(quick: bool) -> list[Row]:
    """Launch 4 local processes and return the rows: ``workload, size, implementation, median_us,
    ratio_to_floor`` (plus ``bytes_per_rank``, ``backend``, ``tensors``)."""
    repeats = 7 if quick else 11
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as outdir:
        env = {**os.environ, "WORLD_SIZE": str(WORLD), "INIT": f"file://{outdir}/rendezvous",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        command = [sys.executable, "-m", "benchmarks.bench_distributed", "--worker", outdir,
                   "--repeats", str(repeats)] + (["--quick"] if quick else [])
        procs = [subprocess.Popen(command, env={**env, "RANK": str(rank)}, cwd=root, start_new_session=True)
                 for rank in range(WORLD)]
        try:
            deadline = time.monotonic() + (300 if quick else 900)
            for proc in procs:
                code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
                if code:
                    raise RuntimeError(f"bench_distributed: a worker exited with code {code}")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return list(json.loads(Path(outdir, "rows.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~3M-parameter model")
    parser.add_argument("--worker", metavar="OUTDIR", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(args.worker, args.quick, args.repeats)
        return
    from . import _harness as harness
    rows = run(args.quick)
    print("machine: " + harness.describe())
    harness.print_table(rows)
    for row in rows:
        print(f"{row['implementation']:<26} moves {row['bytes_per_rank'] / 1e6:.2f} MB per rank")


if __name__ == "__main__":
    main()
