"""Momentum as particle arithmetic on iris: the nytorch 1.1 introduction example, unchanged.

    W_t = (W_{t-1} - lr * G_t) + BETA * (W_{t-1} - W_{t-2})

Run: ``python examples/momentum_iris.py [--epochs 100] [--seed 0]`` (or ``make demo``).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as f
from sklearn.datasets import load_iris
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

from nytorch import NytoModule

iris = load_iris()
x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.2, random_state=0)
x_train = torch.FloatTensor(x_train)
x_test = torch.FloatTensor(x_test)
y_train = torch.LongTensor(y_train)
y_test = torch.LongTensor(y_test)

# Hyperparameter
BETA = 0.9
LR = 0.005
criterion = nn.CrossEntropyLoss()


def train_module(net: "MyModel", lr: float) -> "MyModel":
    new_net = net.clone()
    optimizer = torch.optim.SGD(new_net.parameters(), lr=lr)
    optimizer.zero_grad()
    loss = criterion(new_net(x_train), y_train)
    loss.backward()
    optimizer.step()
    return new_net


@torch.no_grad()
def eval_module(net: nn.Module) -> np.float64:
    net.eval()
    _, predicted = torch.max(net(x_test), 1)
    net.train()
    return accuracy_score(y_test, predicted)


class MyModel(NytoModule):
    def __init__(self, in_feat: int, h_size: int, out_feat: int):
        super().__init__()
        self.layer1 = nn.Linear(in_feat, h_size)
        self.layer2 = nn.Linear(h_size, out_feat)

    def forward(self, inpts):
        h_out = f.relu(self.layer1(inpts))
        return self.layer2(h_out)


def main(epochs: int = 100, seed: int = 0) -> float:
    torch.manual_seed(seed)
    start = time.perf_counter()
    net0: MyModel = MyModel(4, 12, 3)
    net1: MyModel = train_module(net0, LR)
    accuracy = 0.0
    for epoch in range(epochs):
        momentum: MyModel = BETA * (net1 - net0)
        net1, net0 = train_module(net1, LR) + momentum, net1
        if (epoch + 1) % 10 == 0:
            accuracy = eval_module(net1)
            print(f"{epoch=} acc={accuracy:.2f}")
    print(f"time taken: {time.perf_counter() - start:.3f} s for {epochs} epochs")
    return float(accuracy)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initial model (default: %(default)s)")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs: expected a positive number of epochs, got {args.epochs}")
    main(epochs=args.epochs, seed=args.seed)
