"""A stand-in kernel for tests: a kernel that never answers, or dies, as it starts.

Real broken kernels (a port taken before the kernel bound it, a broken conda env, an import error
in a startup file, a GPU driver hang) cannot be made to order, so this small script plays them.
A kernelspec whose ``argv`` runs it (:func:`install_kernelspec`) behaves, per launch, as *mode*
says:

- ``hang-once``: the first launch (no marker file yet) writes the marker and hangs without
  binding a port or answering; every later launch execs a real ipykernel.
- ``hang``: every launch hangs.
- ``exit``: every launch exits at once with code 3 and one line on stderr.

Each launch appends its pid to ``<state>/pids`` so a test can check that none is left running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

EXIT_CODE = 3


def install_kernelspec(data_dir: Path, name: str, mode: str, state: Path) -> Path:
    """Write kernelspec *name* (under ``data_dir/kernels``) running this stand-in in *mode*.

    *state* is a directory for the marker file and the pid list. Returns the kernelspec's dir.
    """
    if mode not in ("hang-once", "hang", "exit"):
        msg = f"mode={mode!r} must be 'hang-once', 'hang' or 'exit'"
        raise ValueError(msg)
    state.mkdir(parents=True, exist_ok=True)
    spec_dir = Path(data_dir) / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", __name__, mode, str(state), "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": f"stand-in ({mode})", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return spec_dir


def launched_pids(state: Path) -> list[int]:
    """The pids of every launch so far (from ``<state>/pids``)."""
    path = Path(state) / "pids"
    if not path.exists():
        return []
    return [int(x) for x in path.read_text().split()]


def _hang() -> None:
    while True:  # no port bound, nothing answered: only a signal ends it
        signal.pause()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["hang-once", "hang", "exit"])
    parser.add_argument("state", type=Path)
    parser.add_argument("-f", dest="connection_file", required=True)
    args = parser.parse_args(argv)
    with open(args.state / "pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    if args.mode == "exit":
        sys.stderr.write("stand-in kernel: exiting as it starts (a broken environment)\n")
        sys.exit(EXIT_CODE)
    marker = args.state / "launched"
    if args.mode == "hang" or not marker.exists():
        marker.touch()
        _hang()
    python = sys.executable
    argv = [python, "-m", "ipykernel_launcher", "-f", args.connection_file]
    os.execv(python, argv)  # noqa: S606 - becomes the real kernel, as a kernelspec would run it


if __name__ == "__main__":
    main()
