"""A small PyTorch model with bugs to find -- the exercise for docs/debugging.md.

Run it locally on the CPU, or upload it and call it from a ``%%gpu_run`` cell on the GPU host::

    python examples/debug_gpu_example.py --device cpu                # trains, prints losses
    python examples/debug_gpu_example.py --device cpu --bug shape    # shape mismatch in forward
    python examples/debug_gpu_example.py --device cpu --bug leak     # memory grows every step

``--bug shape``: the second layer expects 64 features and gets 32; find it with post-mortem pdb
(``%colab_debug`` after the failing cell) or a VS Code breakpoint in ``TinyNet.forward``.
``--bug leak``: the training loop keeps every loss *tensor* (and with it the autograd graph)
instead of ``loss.item()``; watch ``torch.cuda.memory_allocated()`` (on CUDA) or the retained
graph count (on CPU) climb in the printed lines.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, *, bug: str = "none"):
        super().__init__()
        hidden = 32 if bug == "shape" else 64  # the bug: 32 features feed a 64-feature layer
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h)


def memory_in_use(device: torch.device, kept: list) -> str:
    if device.type == "cuda":
        return f"cuda memory_allocated={torch.cuda.memory_allocated(device) / 2**20:.1f} MiB"
    graphs = sum(1 for t in kept if isinstance(t, torch.Tensor) and t.grad_fn is not None)
    return f"retained autograd graphs={graphs}"


def train(*, device: str = "cpu", bug: str = "none", steps: int = 20, seed: int = 0) -> list:
    """Train on a synthetic regression task; returns the per-step losses."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = TinyNet(bug=bug).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(256, 16, device=dev)
    y = x[:, :1] * 2.0 + 0.5
    losses: list = []
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss if bug == "leak" else loss.item())  # the leak: a tensor, not .item()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d} loss {loss.item():.4f} {memory_in_use(dev, losses)}")
    return [float(v) for v in losses]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bug", choices=["none", "shape", "leak"], default="none")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    losses = train(device=args.device, bug=args.bug, steps=args.steps)
    print(f"final loss {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
