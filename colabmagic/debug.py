"""Debugging remote code: post-mortem pdb in the notebook, and VS Code attached through the link.

Post-mortem (``%colab_debug`` after a failed cell) and ``%%colab_debug`` run IPython's own
``%debug`` in the remote kernel: pdb's prompts are ``input()`` calls there, which travel over the
Jupyter stdin channel, so they work in JupyterLab, VS Code notebooks and terminal IPython alike.

``%colab_debug --vscode`` starts debugpy inside the remote kernel listening on the remote's
127.0.0.1 only, forwards it through the link (:meth:`colabmagic.proxy.Proxy.forward`: no extra SSH
tunnel, and the connection survives a dropped link) to a local 127.0.0.1 port, and writes an
attach configuration into ``.vscode/launch.json``.

Both work on every transport. Over SSH (and ``--local``) the agent opens the remote end of the
forward; on a Jupyter-server target, which forwards no port, the link carries it through the kernel
itself (:mod:`colabmagic.transport.jupyter_forward`: control-channel requests up, IOPub chunks down,
answered while the kernel is stopped at a breakpoint), and pdb's prompts ride the websocket's stdin
channel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

from colabmagic.errors import ColabMagicError, ParameterError
from colabmagic.relay import Relay
from colabmagic.session import Session


@dataclass
class VSCodeAttach:
    """Where VS Code should attach, and what was written for it."""

    local_port: int
    remote_port: int
    launch_json: str
    config_name: str
    local_root: str
    remote_root: str


def post_mortem(session: Session, *, relay: Relay | None = None) -> None:
    """Open pdb on the last remote traceback of *session* (IPython's ``%debug``, remotely)."""
    if session.last_error is None:
        msg = (
            f"no failed %%gpu_run cell to debug in session {session.name!r}; "
            "run the failing cell first, or use %%colab_debug to step through a cell"
        )
        raise ParameterError(msg)
    session.run("get_ipython().run_line_magic('debug', '')", relay=relay, store_history=False)


def debug_cell(session: Session, code: str, *, relay: Relay | None = None):
    """Run *code* under pdb in the remote kernel (``%%debug`` there); returns the result."""
    if not code.strip():
        msg = "nothing to debug: %%colab_debug needs a cell body"
        raise ParameterError(msg)
    return session.run(f"%%debug\n{code}", relay=relay)


def start_vscode(
    session: Session,
    *,
    port: int = 0,
    local_root: str | None = None,
    remote_root: str | None = None,
    launch_dir: str | None = None,
) -> VSCodeAttach:
    """Start (or reuse) debugpy in the remote kernel and forward it to 127.0.0.1 here."""
    if not 0 <= port < 65536:
        msg = f"--port {port} must be between 1 and 65535 (or 0 for any free port)"
        raise ParameterError(msg)
    data, _ = session.bulk.request("debugpy", port=0, timeout=60.0)
    remote_port = int(data["port"])
    existing = {r: lp for lp, r in session.proxy.forwards.items()}
    local_port = existing.get(remote_port) or session.proxy.forward(remote_port, port)
    local_root = os.path.abspath(local_root or os.getcwd())
    remote_root = remote_root or session.remote_info.get("cwd") or local_root
    name = f"colabmagic: attach to {session.name}"
    config = {
        "name": name,
        "type": "debugpy",
        "request": "attach",
        "connect": {"host": "127.0.0.1", "port": local_port},
        "pathMappings": [{"localRoot": local_root, "remoteRoot": remote_root}],
        "justMyCode": False,
    }
    path = write_launch_config(os.path.join(launch_dir or local_root, ".vscode"), config)
    return VSCodeAttach(local_port, remote_port, path, name, local_root, remote_root)


def wait_for_client(session: Session, *, relay: Relay | None = None) -> None:
    """Block the remote kernel until a debugger attaches (``debugpy.wait_for_client``)."""
    session.run("import debugpy; debugpy.wait_for_client()", relay=relay, store_history=False)


def stop_vscode(session: Session) -> int:
    """Close the forwards to the kernel's debugpy, here and on the host; returns how many.

    The local listener closes, and so does every connection through it, at both ends (a
    Jupyter-server link closes the kernel's sockets; a link without ``tcp_close`` ignores it).
    """
    closed = 0
    for local_port, remote_port in list(session.proxy.forwards.items()):
        closed += session.proxy.close_forward(local_port)
        with contextlib.suppress(ColabMagicError):
            session.proxy.call("tcp_close", port=remote_port, timeout=10.0)
    return closed


_COMMENTS = re.compile(r'("(?:\\.|[^"\\])*")|//[^\n]*|/\*.*?\*/', re.DOTALL)
_TRAILING_COMMA = re.compile(r'("(?:\\.|[^"\\])*")|,(\s*[}\]])')


def _loads_jsonc(text: str) -> dict:
    """Parse VS Code's JSON-with-comments (comments and trailing commas allowed)."""
    text = _COMMENTS.sub(lambda m: m.group(1) or "", text)
    text = _TRAILING_COMMA.sub(lambda m: m.group(1) or m.group(2), text)
    return json.loads(text)


def write_launch_config(vscode_dir: str, config: dict) -> str:
    """Add or replace (by name) *config* in ``vscode_dir/launch.json``; return its path.

    An existing file that cannot be parsed is left untouched and reported, never overwritten.
    """
    path = os.path.join(vscode_dir, "launch.json")
    doc: dict = {"version": "0.2.0", "configurations": []}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            doc = _loads_jsonc(text) if text.strip() else doc
        except ValueError as exc:
            msg = f"{path} is not valid JSON ({exc}); fix or move it, then rerun %colab_debug"
            raise ColabMagicError(msg) from None
        if not isinstance(doc.get("configurations", []), list):
            msg = f"{path}: 'configurations' must be a list; fix it, then rerun %colab_debug"
            raise ColabMagicError(msg)
    configs = [c for c in doc.get("configurations", []) if c.get("name") != config["name"]]
    doc["configurations"] = [*configs, config]
    doc.setdefault("version", "0.2.0")
    os.makedirs(vscode_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=vscode_dir, prefix=".launch.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=4)
        f.write("\n")
    os.replace(tmp, path)
    return path
