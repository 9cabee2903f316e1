"""A training script that survives a recycled Colab runtime: checkpoint, and resume when told.

The pattern, for any experiment run by ``colabmagic exp daemon``:

- write everything worth keeping to ``$COLABMAGIC_OUTPUT_DIR``; start the daemon with
  ``--outputs-dir /content/drive/MyDrive/colabmagic-outputs`` and that directory is on Google
  Drive, so it outlives the runtime;
- save a checkpoint every few steps, atomically (write a temporary file, then ``os.replace``), so
  a kill at any moment leaves the previous checkpoint intact;
- when ``COLABMAGIC_RESUME=1`` (the daemon restarts a run that was ``interrupted``), load the
  checkpoint and carry on from its step instead of starting over;
- write ``metrics.json`` at the end: the daemon copies it into ``outputs/<name>/`` and commits it.

Run it by hand too::

    COLABMAGIC_OUTPUT_DIR=/tmp/run python examples/resumable_training.py --steps 200
    COLABMAGIC_OUTPUT_DIR=/tmp/run COLABMAGIC_RESUME=1 python examples/resumable_training.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: str, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Atomically replace *path* with the state after *step*."""
    tmp = path + ".tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()}, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="pretend work per step")
    args = parser.parse_args(argv)

    out = os.environ.get("COLABMAGIC_OUTPUT_DIR", "outputs")
    os.makedirs(out, exist_ok=True)
    ckpt = os.path.join(out, CHECKPOINT)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Linear(8, 1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    true_w = torch.arange(8.0, device=device) / 8

    start = 0
    if os.environ.get("COLABMAGIC_RESUME") == "1" and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"] + 1
        print(f"resuming from step {start}", flush=True)
    else:
        print("starting from step 0", flush=True)

    loss = torch.tensor(float("nan"))
    for step in range(start, args.steps):
        x = torch.randn(64, 8, device=device)
        y = x @ true_w + 0.01 * torch.randn(64, device=device)
        loss = nn.functional.mse_loss(model(x).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps - 1:
            save_checkpoint(ckpt, step, model, opt)
            print(f"step {step} loss {loss.item():.5f} (checkpoint)", flush=True)
        time.sleep(args.step_seconds)

    metrics = {"final_loss": loss.item(), "steps": args.steps, "resumed_from": start}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    print(f"done: {metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
