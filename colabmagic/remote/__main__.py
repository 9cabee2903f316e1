"""``python -m colabmagic.remote COMMAND``: the GPU-host side's entry point.

Commands (each prints one JSON document on stdout, except ``bridge`` which speaks the wire
protocol on stdio)::

    start  --root DIR [--id ID] [--cwd DIR] [--python PY] [--mock-gpu] [--idle-timeout S]
           [--env JSON] [--bridge]
                                 start a detached agent + kernel, wait until it listens;
                                 with --bridge, go on as its bridge after the JSON line
    serve  --root DIR --id ID    (internal) the detached supervisor + agent
    bridge --root DIR --id ID    relay stdio to the agent's socket; exit 4 when the agent is
                                 gone (how it died, if it did, on stderr)
    list   --root DIR            the agents there, with their state
    stop   --root DIR --id ID    shut an agent and its kernel down
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from colabmagic.remote.supervisor import DIED_PREFIX, fate
from colabmagic.remote.supervisor import alive as _alive


def _agent_dir(root: str, agent_id: str) -> str:
    if not agent_id or "/" in agent_id or agent_id.startswith("."):
        msg = f"colabmagic: invalid kernel id {agent_id!r}"
        raise SystemExit(msg)
    return os.path.join(os.path.expanduser(root), agent_id)


def _read_state(directory: str):
    try:
        with open(os.path.join(directory, "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cmd_start(args) -> int:
    from colabmagic.remote.agent import new_agent_id

    root = os.path.expanduser(args.root)
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    agent_id = args.id or new_agent_id()
    directory = _agent_dir(root, agent_id)
    os.makedirs(directory, mode=0o700, exist_ok=False)
    cmd = [sys.executable, "-m", "colabmagic.remote", "serve", "--root", root, "--id", agent_id]
    if args.cwd:
        cmd += ["--cwd", args.cwd]
    if args.python:
        cmd += ["--python", args.python]
    if args.mock_gpu:
        cmd.append("--mock-gpu")
    cmd += ["--idle-timeout", str(args.idle_timeout)]
    if args.env:
        cmd += ["--env", args.env]
    with open(os.path.join(directory, "agent.log"), "ab") as logf:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            close_fds=True,
            cwd=directory,
        )
    state = os.path.join(directory, "state.json")  # written once the socket listens
    deadline = time.monotonic() + args.timeout
    while not os.path.exists(state):
        if proc.poll() is not None:
            with open(os.path.join(directory, "agent.log"), errors="replace") as f:
                tail = f.read()[-2000:]
            print(json.dumps({"error": f"agent exited with {proc.returncode}", "log": tail}))
            return 1
        if time.monotonic() > deadline:
            why = f"the agent did not start listening within {args.timeout:g}s"
            print(json.dumps({"error": f"{why}; its log: {directory}/agent.log"}))
            return 1
        time.sleep(0.005)  # polling a file the child creates; bounded by the deadline above
    agent_pid = (_read_state(directory) or {}).get("agent_pid", proc.pid)
    print(json.dumps({"id": agent_id, "agent_pid": agent_pid, "dir": directory}), flush=True)
    if args.bridge:  # the same exec goes on as the bridge: no second round trip to open one
        return _bridge(directory, args.id or agent_id)
    return 0


def cmd_serve(args) -> int:
    """The detached process: a supervisor whose forked child is the agent (see supervisor.py)."""
    from colabmagic.remote.supervisor import supervise

    directory = _agent_dir(args.root, args.id)
    supervisor_pid = os.getpid()

    def agent() -> int:
        from colabmagic.remote.agent import run_agent

        return run_agent(
            directory,
            cwd=args.cwd,
            python=args.python,
            mock_gpu=args.mock_gpu,
            idle_timeout=args.idle_timeout,
            env=json.loads(args.env) if args.env else None,
            supervisor_pid=supervisor_pid,
        )

    return supervise(directory, agent)


def cmd_bridge(args) -> int:
    return _bridge(_agent_dir(args.root, args.id), args.id)


def _bridge(directory: str, agent_id: str) -> int:
    """Relay stdio to the agent; when it has died, say how on stderr and exit 4."""
    from colabmagic.remote.bridge import AGENT_CLOSED, run_bridge

    state = _read_state(directory)
    if state is None:
        sys.stderr.write(f"colabmagic: no running kernel with id {agent_id}\n")
        return 4
    pid = state.get("agent_pid")
    if _alive(pid) and run_bridge(os.path.join(directory, "agent.sock")) != AGENT_CLOSED:
        return 0  # our side closed the link (or the socket is gone: the proxy retries)
    record = fate(directory, pid)
    if record is None:
        return 0  # the agent lives on (another bridge replaced this one)
    if record.get("exit_code") == 0:  # shut down as asked
        sys.stderr.write(f"colabmagic: no running kernel with id {agent_id}\n")
    else:
        sys.stderr.write(DIED_PREFIX + json.dumps(record) + "\n")
    return 4


def list_agents(root: str) -> list:
    root = os.path.expanduser(root)
    out = []
    if not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        state = _read_state(os.path.join(root, name))
        if state is None:
            continue
        if not _alive(state.get("agent_pid")):
            state["state"] = "stopped"
            state["attached"] = False
        out.append(state)
    return out


def cmd_list(args) -> int:
    print(json.dumps(list_agents(args.root)))
    return 0


def cmd_stop(args) -> int:
    directory = _agent_dir(args.root, args.id)
    state = _read_state(directory)
    if state is None:
        print(json.dumps({"error": f"no kernel with id {args.id}"}))
        return 1
    pid = state.get("agent_pid")
    if _alive(pid):
        os.kill(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting on another process's exit, bounded by the deadline
        if _alive(pid):
            kpid = state.get("kernel_pid")
            for p in (kpid, pid):
                if _alive(p):
                    os.kill(int(p), signal.SIGKILL)
    print(json.dumps({"stopped": args.id}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m colabmagic.remote")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("start", "serve", "bridge", "list", "stop"):
        sp = sub.add_parser(name)
        sp.add_argument("--root", default="~/.colabmagic/kernels")
        if name != "list":
            sp.add_argument("--id", required=name != "start")
        if name in ("start", "serve"):
            sp.add_argument("--cwd")
            sp.add_argument("--python")
            sp.add_argument("--mock-gpu", action="store_true")
            sp.add_argument("--idle-timeout", type=float, default=24 * 3600.0)
            sp.add_argument("--env")
        if name == "start":
            sp.add_argument("--bridge", action="store_true", help="then relay stdio to it")
        if name in ("start", "stop"):
            sp.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    return {
        "start": cmd_start,
        "serve": cmd_serve,
        "bridge": cmd_bridge,
        "list": cmd_list,
        "stop": cmd_stop,
    }[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
