"""Runner overhead: 500 trivial experiments through ``exp run`` vs the same commands serially.

Run: ``python benchmarks/experiments.py [N]``. The target is at most 15 ms of overhead per
experiment (status, logs and result files included). Both sides run ``/bin/sh -c true``, the
argv the runner uses for a string command; ``exp run`` is called in-process (interpreter
start-up is not per-experiment cost).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from colabmagic.cli import main as cli_main


def serial(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/sh", "-c", "true"], check=True)
    return time.perf_counter() - t0


def through_exp_run(n: int, slots: int = 1) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        entries = [{"name": f"t{i:04d}", "command": "true", "status": "pending", "timeout": 60}
                   for i in range(n)]  # fmt: skip
        Path(tmp, "experiments.json").write_text(json.dumps(entries, indent=2))
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main(["exp", "-C", tmp, "run", "--slots", str(slots)], standalone_mode=False)
        elapsed = time.perf_counter() - t0
        statuses = [json.loads(p.read_text())["status"]
                    for p in Path(tmp, "outputs").glob("*/status.json")]  # fmt: skip
        if len(statuses) != n or set(statuses) != {"completed"}:
            raise RuntimeError(f"not all experiments completed: {set(statuses)}")
    return elapsed


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    base = serial(n)
    ours = through_exp_run(n)
    per = (ours - base) / n * 1000
    print(f"{n} x `true`: serial subprocess {base:.2f}s ({base / n * 1000:.2f} ms each)")
    print(f"{n} x `true`: exp run --slots 1  {ours:.2f}s ({ours / n * 1000:.2f} ms each)")
    print(f"runner overhead per experiment: {per:.2f} ms (target <= 15 ms): "
          f"{'OK' if per <= 15 else 'OVER TARGET'}")  # fmt: skip


if __name__ == "__main__":
    main()
