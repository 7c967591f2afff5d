"""Hybrid PSO + SGD on iris: a swarm of 32 MLPs trained together in batched calls.

Every step runs one SGD step on all 32 members (one vectorised gradient call); every
``--every`` steps a PSO step moves each member toward its personal best and the swarm's
best (velocities, inertia / cognitive / social form).  Prints progress, reports the test
accuracy of the best member and saves a plot of the best and mean training loss per step.

Run: ``python examples/swarm_iris.py [--steps 300] [--out loss.png] [--resume run.pt]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn

import nytorch.algorithms as alg
from nytorch import CheckpointError, StructureError
from nytorch._checkpoint import load as load_checkpoint
from nytorch._checkpoint import save as save_checkpoint
from nytorch._swarm import Swarm

SWARM_SIZE = 32


@dataclasses.dataclass
class Config:
    """Hyperparameters of the run."""

    steps: int = 300
    lr: float = 0.1
    every: int = 10          # a PSO step every this many SGD steps
    inertia: float = 0.5
    cognitive: float = 0.8
    social: float = 0.8
    seed: int = 0
    print_every: int = 25


@dataclasses.dataclass
class TrainState:
    """Everything the loop carries from one step to the next (what a checkpoint must hold)."""

    swarm: Swarm                      # the 32 members' parameters
    pso: alg.PSOState                 # velocities, personal bests and their losses
    generator: torch.Generator        # the only source of randomness after initialisation
    step: int = 0                     # steps done
    best_loss: list[float] = dataclasses.field(default_factory=list)   # per step
    mean_loss: list[float] = dataclasses.field(default_factory=list)   # per step


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iris split as in the momentum example (80/20, ``random_state=0``), features standardised on train."""
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.2, random_state=0)
    x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0)
    return (x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test)


def model() -> nn.Module:
    """One member: a 4-16-3 MLP."""
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def loss_fn(member: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one member (``member(x)`` runs its forward)."""
    return F.cross_entropy(member(x), y)


def losses_of(swarm: Swarm, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every member's loss, from one vectorised forward."""
    with torch.no_grad():
        logits = swarm(x)  # [P, N, 3]
        return F.cross_entropy(logits.transpose(1, 2), y.expand(len(swarm), -1), reduction="none").mean(1)


def accuracies(swarm: Swarm, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every member's accuracy on ``(x, y)``."""
    with torch.no_grad():
        return (swarm(x).argmax(-1) == y).float().mean(1)


def init_state(config: Config, x: torch.Tensor, y: torch.Tensor) -> TrainState:
    """32 freshly initialised members, zero velocities, personal bests at the start."""
    torch.manual_seed(config.seed)
    swarm = Swarm.stack([model() for _ in range(SWARM_SIZE)])
    generator = torch.Generator().manual_seed(config.seed)
    return TrainState(swarm, alg.pso_init(swarm, losses_of(swarm, x, y)), generator)


def train_step(state: TrainState, config: Config, x: torch.Tensor, y: torch.Tensor) -> TrainState:
    """One SGD step on every member; a PSO step every ``config.every`` steps."""
    swarm, losses = alg.sgd_step(state.swarm, loss_fn, x, y, lr=config.lr)
    pso = state.pso
    if (state.step + 1) % config.every == 0:
        swarm, pso = alg.pso_step(swarm, losses_of(swarm, x, y), pso, inertia=config.inertia,
                                  cognitive=config.cognitive, social=config.social, generator=state.generator)
    return dataclasses.replace(state, swarm=swarm, pso=pso, step=state.step + 1,
                               best_loss=state.best_loss + [float(losses.min())],
                               mean_loss=state.mean_loss + [float(losses.mean())])


def save_plot(state: TrainState, path: str) -> str:
    """Best and mean training loss per step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    steps = range(1, len(state.best_loss) + 1)
    axes.plot(steps, state.best_loss, label="best member")
    axes.plot(steps, state.mean_loss, label="swarm mean")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (cross-entropy)")
    axes.set_yscale("log")
    axes.set_title(f"Hybrid PSO + SGD on iris, {SWARM_SIZE} MLPs")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return os.path.abspath(path)


def out_path_error(path: str, option: str = "--out") -> Optional[str]:
    """Why ``path`` cannot take the plot (checked before training, which takes a while), or ``None``."""
    if os.path.isdir(path):
        return f"{option}: expected an image file name, got the folder {path!r}"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"{option}: expected a file in a folder that exists, got {path!r}"
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if os.path.splitext(path)[1].lower().lstrip(".") not in formats:
        return f"{option}: expected a file name ending in an image format ({', '.join(formats)}), got {path!r}"
    return None


def run(config: Config, out: str, resume: Optional[str] = None) -> dict[str, Any]:
    """Train, print progress, save the plot; returns the final metrics.

    With ``resume``, the run continues from that checkpoint when it exists and writes it
    (atomically) at every progress line and at the end: a run stopped at any point and
    resumed gives bitwise the same result as an uninterrupted one.
    """
    x_train, y_train, x_test, y_test = load_data()
    state = init_state(config, x_train, y_train)
    if resume and os.path.exists(resume):
        state = load_checkpoint(resume, like=state)  # swarm, PSO state, generator, step, loss history
        print(f"resumed from {resume} at step {state.step}", flush=True)
    start = time.perf_counter()
    while state.step < config.steps:
        state = train_step(state, config, x_train, y_train)
        if state.step % config.print_every == 0 or state.step == config.steps:
            test = accuracies(state.swarm, x_test, y_test)
            print(f"step {state.step:4d}/{config.steps}  best loss {state.best_loss[-1]:.4f}  "
                  f"mean loss {state.mean_loss[-1]:.4f}  test accuracy: best {float(test.max()):.3f} "
                  f"mean {float(test.mean()):.3f}", flush=True)
            if resume:
                save_checkpoint(state, resume)
    if resume:
        save_checkpoint(state, resume)
    best = int(losses_of(state.swarm, x_train, y_train).argmin())  # chosen on training data only
    accuracy = float(accuracies(state.swarm[[best]], x_test, y_test)[0])
    path = save_plot(state, out)
    seconds = time.perf_counter() - start
    print(f"best member (by training loss) #{best}: test accuracy {accuracy:.3f}; {seconds:.1f} s")
    print(f"saved loss plot to {path}")
    return {"accuracy": accuracy, "best": best, "plot": path, "seconds": seconds, "state": state}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command-line entry point (also callable from tests and notebooks)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=Config.steps, help="SGD steps (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "swarm_iris_loss.png"),
                        help="where to save the loss plot (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--resume", metavar="PATH", default=None,
                        help="checkpoint to continue from if it exists, rewritten at every progress line "
                             "(resumed runs equal uninterrupted ones bitwise)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while training (default: %(default)s; the kernels are tiny)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: expected a positive number of steps, got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads: expected a positive number of threads, got {args.threads}")
    problem = out_path_error(args.out)
    if problem is None and args.resume is not None:
        if os.path.isdir(args.resume):
            problem = f"--resume: expected a checkpoint file name, got the folder {args.resume!r}"
        elif not os.path.isdir(os.path.dirname(os.path.abspath(args.resume))):
            problem = f"--resume: expected a file in a folder that exists, got {args.resume!r}"
    if problem:
        parser.error(problem)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(Config(steps=args.steps, seed=args.seed), args.out, args.resume)
    except (CheckpointError, StructureError) as error:  # a --resume file that is no checkpoint of this run
        if args.resume is None:
            raise
        parser.error(f"--resume: {error}")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
