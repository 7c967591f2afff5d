# %% [markdown]
# # 02 · Momentum as particle arithmetic
#
# Gradient descent with momentum is usually written with a velocity:
#
# $$V_t = \beta V_{t-1} + G_t, \qquad W_t = W_{t-1} - \eta V_t.$$
#
# Unrolled, the same update is a step of plain gradient descent plus a multiple of the last move:
#
# $$W_t = (W_{t-1} - \eta G_t) + \beta\,(W_{t-1} - W_{t-2}).$$
#
# With nytorch the second form is one line on whole models, where `stepped` is `net1` after one
# plain SGD step (`train_module` below returns it with its loss):
# `net1, net0 = stepped + BETA * (net1 - net0), net1`.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split

import nytorch as nyto

torch.set_num_threads(1)  # a 4-12-3 MLP gains nothing from more threads; timings stay steady
iris = load_iris()
x_train, x_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.2, random_state=0)
x_train, x_test = torch.FloatTensor(x_train), torch.FloatTensor(x_test)
y_train, y_test = torch.LongTensor(y_train), torch.LongTensor(y_test)
BETA, LR, EPOCHS = 0.9, 0.005, 300
criterion = nn.CrossEntropyLoss()


class MyModel(nyto.NytoModule):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(4, 12)
        self.layer2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.layer2(F.relu(self.layer1(x)))


def train_module(net, lr):
    new_net = net.clone()
    optimizer = torch.optim.SGD(new_net.parameters(), lr=lr)
    optimizer.zero_grad()
    loss = criterion(new_net(x_train), y_train)
    loss.backward()
    optimizer.step()
    return new_net, loss.item()

# %% [markdown]
# ## Particle momentum

# %%
torch.manual_seed(0)
start = MyModel()
net0 = start
net1, _ = train_module(net0, LR)
particle_losses = []
began = time.perf_counter()
for epoch in range(EPOCHS):
    stepped, loss = train_module(net1, LR)
    net1, net0 = stepped + BETA * (net1 - net0), net1
    particle_losses.append(loss)
print(f"particle momentum: {time.perf_counter() - began:.2f} s for {EPOCHS} epochs, final loss {particle_losses[-1]:.4f}")

# %% [markdown]
# ## `torch.optim.SGD(momentum=BETA)` from the same start
# PyTorch's momentum keeps a velocity buffer; its first step has no momentum, like ours, so after the
# first plain step both algorithms visit the same weights.

# %%
reference = start.clone()
optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=BETA)
sgd_losses = []
for epoch in range(EPOCHS + 1):
    optimizer.zero_grad()
    loss = criterion(reference(x_train), y_train)
    loss.backward()
    optimizer.step()
    sgd_losses.append(loss.item())
sgd_losses = sgd_losses[1:]
gap = max(abs(a - b) for a, b in zip(particle_losses, sgd_losses))
print(f"largest loss difference between the two: {gap:.2e}")

# %%
plt.figure(figsize=(6, 3.5))
plt.plot(particle_losses, label="nytorch: W + β(W₁ − W₀)", linewidth=3, alpha=0.6)
plt.plot(sgd_losses, label="torch.optim.SGD(momentum=β)", linestyle="--")
plt.xlabel("epoch"); plt.ylabel("training loss"); plt.legend(); plt.title("Momentum two ways on iris")
plt.tight_layout()
plt.show()

# %%
with torch.no_grad():
    accuracy = (net1(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy after {EPOCHS} epochs: {accuracy:.2f}")
