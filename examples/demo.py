"""``make demo``: nytorch at its best in under a minute.

1. The seed example: momentum written as arithmetic on whole models (``examples/momentum_iris.py``).
2. A swarm of 32 MLPs trained by hybrid PSO + SGD in batched calls (``examples/swarm_iris.py``),
   with a progress bar (printed progress lines when tqdm is missing).
3. A plot of the swarm's best and mean loss per step, written to a file whose path is printed.

Run: ``python examples/demo.py [--steps 300] [--out PATH] [--no-bar]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling examples, however we are run

import momentum_iris  # noqa: E402
import swarm_iris  # noqa: E402

from nytorch import algorithms as alg  # noqa: E402


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def swarm_run(steps: int, out: str, *, bar: bool) -> dict[str, Any]:
    """``swarm_iris``'s training loop under a progress bar; returns accuracy, plot path and seconds."""
    config = swarm_iris.Config(steps=steps)
    x_train, y_train, x_test, y_test = swarm_iris.load_data()
    state = swarm_iris.init_state(config, x_train, y_train)
    began = time.perf_counter()
    # Forced on (when asked): under `make` or a pipe stderr may not be a terminal, and a demo must show it.
    steps_iter: Any = alg.progress(range(steps), total=steps, desc=f"swarm of {swarm_iris.SWARM_SIZE} MLPs",
                              enabled=bar)
    has_bar = hasattr(steps_iter, "set_postfix")
    for _ in steps_iter:
        state = swarm_iris.train_step(state, config, x_train, y_train)
        if has_bar:
            steps_iter.set_postfix(best=f"{state.best_loss[-1]:.4f}", mean=f"{state.mean_loss[-1]:.4f}",
                                   refresh=False)
        elif state.step % 50 == 0 or state.step == steps:
            print(f"step {state.step:4d}/{steps}  best loss {state.best_loss[-1]:.4f}  "
                  f"mean loss {state.mean_loss[-1]:.4f}", flush=True)
    if has_bar:
        steps_iter.close()
    seconds = time.perf_counter() - began
    best = int(swarm_iris.losses_of(state.swarm, x_train, y_train).argmin())  # chosen on training data
    accuracy = float(swarm_iris.accuracies(state.swarm[[best]], x_test, y_test)[0])
    return {"accuracy": accuracy, "best": best, "seconds": seconds, "plot": swarm_iris.save_plot(state, out),
            "best_loss": state.best_loss[-1], "mean_loss": state.mean_loss[-1]}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the demo; returns the swarm run's results (accuracy, plot path, ...)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="swarm training steps (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=100, help="momentum example epochs (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "nytorch_demo_swarm.png"),
                        help="where to write the plot (default: %(default)s)")
    parser.add_argument("--no-bar", dest="bar", action="store_false",
                        help="print progress lines instead of a tqdm bar")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.epochs < 1:
        parser.error(f"--steps and --epochs: expected positive numbers, got {args.steps} and {args.epochs}")
    problem = swarm_iris.out_path_error(args.out)  # before training, not after it
    if problem:
        parser.error(problem)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is fastest (and immune to a busy machine)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    banner("1/2  momentum as particle arithmetic: W ← train(W) + β·(W − W_prev)")
    momentum_iris.main(epochs=args.epochs)

    banner(f"2/2  hybrid PSO + SGD: {swarm_iris.SWARM_SIZE} MLPs as one Swarm, one vectorised call per step")
    result = swarm_run(args.steps, args.out, bar=args.bar)
    print(f"{args.steps} steps in {result['seconds']:.1f} s; best loss {result['best_loss']:.4f}, "
          f"mean loss {result['mean_loss']:.4f}")
    print(f"best member (by training loss) #{result['best']}: test accuracy {result['accuracy']:.3f}")
    print(f"\nplot of the swarm's best and mean loss per step: {result['plot']}")
    print(f"(demo finished in {time.perf_counter() - began:.1f} s)")
    return result


if __name__ == "__main__":
    main()
