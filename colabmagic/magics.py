"""The IPython magics: thin wrappers that parse arguments and call the session API.

Nothing here touches ZeroMQ, paramiko or Jupyter messages. Library errors
(:class:`~colabmagic.errors.ColabMagicError`) become one-line ``UsageError``; a failing remote
cell raises :class:`~colabmagic.errors.RemoteError`, whose traceback is the remote one.
"""

from __future__ import annotations

import functools
import html
import json
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Unicode

from colabmagic import comms
from colabmagic.errors import (
    CellTimeoutError,
    ColabMagicError,
    RemoteError,
    RemoteKernelDied,
)
from colabmagic.relay import CellRelay
from colabmagic.session import Session, registry

# Options several magics share (IPython's argument decorators are reusable).
_on = argument("--on", metavar="NAME", help="session name")
_compress = argument(
    "--compress",
    choices=("auto", "zstd", "none"),
    help="zstd per chunk: auto (default: where it pays at the link's rate), zstd or none",
)


def _user_errors(fn):
    """Turn library errors into one-line UsageErrors; let remote errors through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RemoteError, CellTimeoutError, RemoteKernelDied):
            raise
        except ColabMagicError as exc:
            raise UsageError(str(exc)) from None

    return wrapper


def _via(copied: int) -> str:
    """`` (via openssh)``: what carried a file copy over SSH (the transport says)."""
    via = getattr(copied, "via", "")
    return f" (via {via})" if via in ("openssh", "paramiko") else ""


def _names(text: str | None) -> list[str]:
    if not text:
        return []
    out = [n.strip() for n in text.replace(",", " ").split() if n.strip()]
    bad = [n for n in out if not n.isidentifier()]
    if bad:
        msg = f"{bad[0]!r} is not a valid variable name"
        raise UsageError(msg)
    return out


def _can_ask(shell) -> bool:
    """True when input() reaches a person (a notebook frontend that allows stdin, a terminal)."""
    import sys

    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        return bool(getattr(kernel, "_allow_stdin", False))
    return sys.stdin is not None and sys.stdin.isatty()


class _Table:
    """A small table that renders as text in a terminal and HTML in a notebook."""

    def __init__(self, rows: list[dict[str, Any]], columns: list[str]):
        self.rows = rows
        self.columns = columns

    def _cells(self) -> list[list[str]]:
        """The rows as strings, ``-`` for a missing value."""
        return [
            [str(r[c]) if r.get(c) is not None else "-" for c in self.columns] for r in self.rows
        ]

    def __repr__(self) -> str:
        cells = self._cells()
        widths = [
            max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(self.columns)
        ]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
            for row in self._cells()
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@magics_class
class ColabMagics(Magics):
    """Magics to drive a remote (or local) GPU kernel from this notebook.

    Configure in ``ipython_config.py``::

        c.ColabMagics.default_target = "colab"   # what a bare %colab_connect connects to
        c.ColabMagics.cell_timeout = 0           # seconds; 0 = no limit
    """

    default_target = Unicode(
        "", help="Target of a bare %colab_connect: an ssh alias/host, or 'local'."
    ).tag(config=True)
    default_mock_gpu = Bool(False, help="Use the NumPy GPU mock for --local kernels.").tag(
        config=True
    )
    connect_timeout = Float(60.0, help="Seconds to wait for a kernel to answer.").tag(config=True)
    reconnect_timeout = Float(
        300.0, help="Seconds to keep reconnecting after the link drops before giving up."
    ).tag(config=True)
    cell_timeout = Float(0.0, help="Default %%gpu_run timeout in seconds (0: none).").tag(
        config=True
    )
    auto_sync = Bool(
        False, help="%%gpu_run syncs the project first (as --sync; --no-sync skips it)."
    ).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.started: set[str] = set()

    def shutdown_all(self) -> None:
        """Close every session this extension started (used by %unload_ext)."""
        for name in list(self.started):
            if name in registry.names():
                registry.remove(name).close()
        self.started.clear()

    # -- %colab_connect ----------------------------------------------------------------------
    @magic_arguments()
    @argument("target", nargs="?", help="colab:// line, ssh alias or [user@]host[:port]")
    @argument("--name", default="default", help="session name (several can be open at once)")
    @argument("--local", action="store_true", help="a kernel on this machine, through the link")
    @argument("--mock-gpu", action="store_true", help="`import cupy` gives a NumPy-backed mock")
    @argument("--restart", action="store_true", help="restart the session's kernel")
    @argument("--attach", metavar="ID", help="attach to a kernel that is still running")
    @argument("--cwd", help="working directory of the kernel")
    @argument("--python", help="interpreter for the kernel on the host")
    @argument("-p", "--port", type=int, help="ssh port")
    @argument("-i", "--identity", help="ssh private key file")
    @argument("--proxy", metavar="CMD", help="ssh ProxyCommand")
    @argument("--accept-new-host-key", action="store_true", help="record an unknown host key")
    @argument("--connect-timeout", type=float, help="seconds (default: config)")
    @argument("--token-env", metavar="VAR", help="Jupyter server: token variable (JUPYTER_TOKEN)")
    @argument("--kernel-name", metavar="SPEC", help="Jupyter server: kernelspec to start")
    @argument("--start-timeout", type=float, help="Jupyter server: seconds to first answer (20)")
    @argument("--save", metavar="ALIAS", help="colab:// line: also write ~/.ssh/config")
    @argument("--print-key", action="store_true", help="print your public key to paste in Colab")
    @argument("--create", action="store_true", help="with --print-key: create a key if none")
    @line_magic
    @_user_errors
    def colab_connect(self, line: str = ""):
        """Connect this notebook to a GPU kernel (a remote host over SSH, or --local).

        Examples
        --------
        ::

            %colab_connect --print-key             # your public key, for serve() in Colab
            %colab_connect colab://root@x.trycloudflare.com?via=cloudflared&fp=SHA256:...
            %colab_connect --local --mock-gpu      # a kernel on this machine, cupy mocked
            %colab_connect gpu-box                 # an alias from ~/.ssh/config
            %colab_connect user@10.0.0.5:2222 --name big
            %colab_connect --restart               # fresh kernel, same session
            %colab_connect gpu-box --attach 20261128-101500-ab12cd
            %colab_connect https://hub.example.org/user/me/   # a Jupyter server, no SSH
        """
        args = parse_argstring(self.colab_connect, line)
        if args.print_key:
            print(self._public_key(args.create))
            return
        from colabmagic.connection import connect

        target = args.target or None
        local = args.local
        if target is None and not local and not args.restart:
            if self.default_target in ("", "local"):
                local = self.default_target == "local"
            else:
                target = self.default_target
        ssh_opts = {
            k: v
            for k, v in {
                "port": args.port,
                "identity": args.identity,
                "proxy_command": args.proxy,
                "accept_new_host_key": args.accept_new_host_key or None,
                "token_env": args.token_env,
                "kernel_name": args.kernel_name,
                "start_timeout": args.start_timeout,
            }.items()
            if v is not None
        }
        session = connect(
            target,
            local=local,
            name=args.name,
            mock_gpu=args.mock_gpu or (local and self.default_mock_gpu),
            attach=args.attach,
            restart=args.restart,
            cwd=args.cwd,
            python=args.python,
            connect_timeout=args.connect_timeout or self.connect_timeout,
            reconnect_timeout=self.reconnect_timeout,
            save=args.save,
            **ssh_opts,
        )
        self.started.add(session.name)
        st = session.status()
        verb = "restarted" if args.restart else "connected"
        print(
            f"{verb}: session {session.name!r} -> {st['target']} kernel {session.kernel_id} "
            f"(python {st['python']}, GPU {st['gpu']})"
        )
        note = _start_note(session)
        if note:  # a kernel that never answered was replaced: say so
            print(f"note: {note}")
        if args.save:
            print(f"saved: `ssh {args.save}` and %colab_connect {args.save} now work too")

    def _public_key(self, create: bool) -> str:
        """Your public key; with none, create one if asked (--create or a yes at the prompt)."""
        from colabmagic import userkey

        try:
            return userkey.public_key()
        except userkey.NoKeyError:
            offer = f"No SSH key in ~/.ssh. Create {userkey.DEFAULT_KEY} (no passphrase)? [y/N] "
            if not (create or (_can_ask(self.shell) and input(offer).strip().lower() == "y")):
                raise
        return userkey.create_key()

    # -- %%gpu_run ---------------------------------------------------------------------------
    @magic_arguments()
    @argument("--on", metavar="NAME", help="the session to run in (default: the current one)")
    @argument("--timeout", type=float, metavar="S", help="interrupt the remote cell after S s")
    @argument("--push", metavar="A,B", help="local variables to send before running")
    @argument("--pull", metavar="C,D", help="remote variables to fetch after running")
    @argument("--sync", action="store_true", help="sync the project first (as %%colab_sync)")
    @argument("--no-sync", action="store_true", help="do not sync, even with auto_sync")
    @argument("statement", nargs="*", help="code to run (line form)")
    @line_cell_magic
    @_user_errors
    def gpu_run(self, line: str = "", cell: str | None = None):
        """Run a cell (or one statement) in the remote kernel; output appears here.

        Examples
        --------
        ::

            %%gpu_run
            import cupy as cp
            print(cp.arange(10).sum())

            %%gpu_run --timeout 60 --push x --pull y
            y = x * 2

            %gpu_run print(torch.cuda.is_available())
        """
        args = parse_argstring(self.gpu_run, line)
        code = cell if cell is not None else " ".join(args.statement)
        if cell is not None and args.statement:
            msg = f"unexpected arguments after the options: {' '.join(args.statement)!r}"
            raise UsageError(msg)
        if not code.strip():
            msg = "nothing to run: give a statement (%gpu_run STMT) or a cell body (%%gpu_run)"
            raise UsageError(msg)
        session = registry.get(args.on)
        if (args.sync or self.auto_sync) and not args.no_sync:
            from colabmagic.sync import sync

            result = sync(session)
            if result.changed or result.kept or result.skipped or result.conflicts:
                print(result.summary())
        push = _names(args.push)
        if push:
            session.push(self._local_values(push))
        timeout = args.timeout if args.timeout is not None else (self.cell_timeout or None)
        relay = comms.cell_relay(session)  # widgets: comms relayed when this is a kernel
        result = session.run(code, timeout=timeout, relay=relay)
        for note in comms.notes(session, relay):
            print(note)
        pull = _names(args.pull)
        if pull:
            self._pull(session, pull)
        return result.result

    def _local_values(self, names: list[str]) -> dict[str, Any]:
        ns = self.shell.user_ns
        missing = [n for n in names if n not in ns]
        if missing:
            msg = f"name {missing[0]!r} is not defined locally"
            raise UsageError(msg)
        return {n: ns[n] for n in names}

    def _pull(self, session: Session, names: list[str], compress: str | None = None) -> None:
        """Fetch remote *names* into the local namespace."""
        values = session.pull(*names, compress=compress)
        self.shell.user_ns.update(values if len(names) > 1 else {names[0]: values})

    # -- variables ---------------------------------------------------------------------------
    @magic_arguments()
    @argument("names", nargs="+", help="local variable names")
    @_on
    @_compress
    @line_magic
    @_user_errors
    def colab_push(self, line: str = ""):
        """Send local variables to the remote kernel (NumPy arrays travel without copies).

        Example: ``%colab_push x weights``
        """
        args = parse_argstring(self.colab_push, line)
        names = _names(" ".join(args.names))
        registry.get(args.on).push(self._local_values(names), compress=args.compress)

    @magic_arguments()
    @argument("names", nargs="+", help="remote variable names")
    @_on
    @_compress
    @line_magic
    @_user_errors
    def colab_pull(self, line: str = ""):
        """Fetch remote variables into the local namespace.

        Example: ``%colab_pull losses model_state``
        """
        args = parse_argstring(self.colab_pull, line)
        self._pull(registry.get(args.on), _names(" ".join(args.names)), args.compress)

    @magic_arguments()
    @argument("action", nargs="?", choices=["save", "load"], help="save or load")
    @argument("args", nargs="*", help="save: NAME VAR [VAR ...]; load: NAME")
    @argument("--list", action="store_true", help="list the snapshots on this machine")
    @argument("--delete", metavar="NAME", help="delete a snapshot")
    @_on
    @line_magic
    @_user_errors
    def colab_snapshot(self, line: str = ""):
        """Keep remote variables on this machine and put them into another runtime later.

        Snapshots live in ~/.colabmagic/snapshots/NAME (torch tensors and CuPy arrays are moved
        to the CPU first), so a recycled Colab runtime loses nothing you saved.

        Examples
        --------
        ::

            %colab_snapshot save epoch3 model_state losses
            %colab_snapshot load epoch3          # into the runtime connected now
            %colab_snapshot --list
            %colab_snapshot --delete epoch3
        """
        from colabmagic import snapshot

        args = parse_argstring(self.colab_snapshot, line)
        if args.list:
            return _Table(snapshot.list_snapshots(), ["name", "variables", "bytes", "created"])
        if args.delete:
            snapshot.delete(args.delete)
            print(f"deleted snapshot {args.delete!r}")
            return None
        if args.action is None or not args.args or (args.action == "load" and len(args.args) > 1):
            msg = "use %colab_snapshot save NAME VAR [VAR ...] | load NAME | --list | --delete NAME"
            raise UsageError(msg)
        session = registry.get(args.on)
        if args.action == "save":
            meta = snapshot.save(session, args.args[0], _names(" ".join(args.args[1:])))
            print(f"saved {', '.join(meta['names'])} ({meta['bytes']} bytes) as {args.args[0]!r}")
        else:
            names = snapshot.load(session, args.args[0])
            print(f"loaded {', '.join(names)} from snapshot {args.args[0]!r}")
        return None

    # -- files -------------------------------------------------------------------------------
    @magic_arguments()
    @argument("local", help="local file or directory")
    @argument("remote", nargs="?", help="remote path (default: same name in the kernel's cwd)")
    @_on
    @_compress
    @line_magic
    @_user_errors
    def colab_upload(self, line: str = ""):
        """Copy a local file or directory (recursively) to the remote host.

        Resumes after a dropped link (and when run again), verifies sha256, and renames each
        file into place only once it is complete.

        Example: ``%colab_upload data/ /content/data``
        """
        args = parse_argstring(self.colab_upload, line)
        n = registry.get(args.on).upload(args.local, args.remote, compress=args.compress)
        print(f"uploaded {n} bytes{_via(n)}")

    @magic_arguments()
    @argument("remote", help="remote file or directory")
    @argument("local", nargs="?", help="local path (default: same name here)")
    @_on
    @_compress
    @line_magic
    @_user_errors
    def colab_download(self, line: str = ""):
        """Copy a remote file or directory (recursively) here.

        Example: ``%colab_download runs/model.pt``
        """
        args = parse_argstring(self.colab_download, line)
        n = registry.get(args.on).download(args.remote, args.local, compress=args.compress)
        print(f"downloaded {n} bytes{_via(n)}")

    @magic_arguments()
    @argument("local_dir", nargs="?", help="project directory here (default: the last one, or .)")
    @argument("remote_dir", nargs="?", help="directory on the host (default: the kernel's cwd)")
    @argument("--down", action="store_true", help="fetch files new or changed on the host")
    @argument("--exclude", action="append", metavar="PATTERN", help="skip (gitignore syntax)")
    @argument("--no-gitignore", action="store_true", help="do not honour .gitignore")
    @argument("--autoreload", action="store_true", help="reload changed modules in the kernel")
    @argument("--force", action="store_true", help="overwrite files changed on both sides")
    @_on
    @line_magic
    @_user_errors
    def colab_sync(self, line: str = ""):
        """Mirror a project directory to the host (changed files only), or its outputs back.

        Honours ``.gitignore``; deletes on the host only files a sync put there. ``%%gpu_run
        --sync`` (or ``c.ColabMagics.auto_sync = True``) repeats the last ``%colab_sync``.

        Examples
        --------
        ::

            %colab_sync . proj --autoreload --exclude data/   # edits, renames, deletes mirrored
            %colab_sync --down                                # the host's new outputs come back
        """
        from colabmagic.sync import sync

        args = parse_argstring(self.colab_sync, line)
        result = sync(
            registry.get(args.on),
            args.local_dir,
            args.remote_dir,
            down=args.down,
            exclude=args.exclude,
            gitignore=False if args.no_gitignore else None,
            autoreload=True if args.autoreload else None,
            force=args.force,
        )
        print(result.summary())

    # -- debugging ---------------------------------------------------------------------------
    @magic_arguments()
    @_on
    @argument("--vscode", action="store_true", help="let VS Code attach (debugpy via the link)")
    @argument("--port", type=int, default=0, help="local port for VS Code (default: any free)")
    @argument("--wait", action="store_true", help="block the kernel until VS Code attaches")
    @argument("--local-root", help="local project folder (pathMappings; default: cwd)")
    @argument("--remote-root", help="remote folder it maps to (default: the kernel's cwd)")
    @argument("--stop", action="store_true", help="close the VS Code forward")
    @line_cell_magic
    @_user_errors
    def colab_debug(self, line: str = "", cell: str | None = None):
        """Debug remote code: post-mortem pdb, a cell under pdb, or VS Code breakpoints.

        Examples
        --------
        ::

            %colab_debug                  # pdb on the last failed %%gpu_run cell
            %%colab_debug                 # run this cell under pdb, remotely
            x = f(1)
            %colab_debug --vscode         # debugpy in the kernel, .vscode/launch.json written
            %colab_debug --stop
        """
        from colabmagic import debug

        args = parse_argstring(self.colab_debug, line)
        session = registry.get(args.on)
        if cell is not None:
            return debug.debug_cell(session, cell, relay=CellRelay()).result
        if args.stop:
            n = debug.stop_vscode(session)
            print(f"closed {n} debugger forward(s)" if n else "no debugger forward was open")
            return None
        if not args.vscode:
            debug.post_mortem(session, relay=CellRelay())
            return None
        info = debug.start_vscode(
            session, port=args.port, local_root=args.local_root, remote_root=args.remote_root
        )
        print(
            f"debugpy listens in the remote kernel (127.0.0.1:{info.remote_port} there), "
            f"forwarded to 127.0.0.1:{info.local_port} here.\n"
            f"1. In VS Code, open {info.local_root} and pick the launch configuration "
            f"'{info.config_name}' (written to {info.launch_json}).\n"
            "2. Press F5, set breakpoints, then run the %%gpu_run cell that calls your code."
        )
        if args.wait:
            print("waiting for VS Code to attach...")
            debug.wait_for_client(session, relay=CellRelay())
        return None

    # -- sessions ----------------------------------------------------------------------------
    @magic_arguments()
    @argument("name", nargs="?", help="one session (default: all)")
    @argument("--json", action="store_true", help="print JSON")
    @line_magic
    @_user_errors
    def colab_status(self, line: str = ""):
        """Show each session: target, state, kernel pid, Python, GPU, link latency, and how the
        kernel's channels listen on the host (``ipc``: Unix sockets; ``tcp`` only without IPC).

        While the link is down, the state says which: "host unreachable since HH:MM (tunnel
        gone?)" (no reconnect attempt reaches the host) or "link down, kernel alive".

        Example: ``%colab_status``
        """
        args = parse_argstring(self.colab_status, line)
        sessions = [registry.get(args.name)] if args.name else registry.sessions()
        if not sessions:
            registry.get()  # raises the "connect first" error
        from colabmagic import linkstate

        rows = [linkstate.status(s) for s in sessions]
        for r, s in zip(rows, sessions, strict=True):
            r["current"] = "*" if r["name"] == registry.current else ""
            r["delivery"] = _delivery(s)
            r["start_note"] = _start_note(s)
        if args.json:
            print(json.dumps(rows, indent=1))
            return None
        cols = ["current", "name", "target", "state", "kernel_pid", "python", "gpu", "latency_ms"]
        cols.append("delivery")
        cols.append("kernel_transport")  # ipc, or tcp where the host has no Unix sockets
        if any(r["start_note"] for r in rows):  # a kernel that never answered was replaced
            cols.append("start_note")
        return _Table(rows, cols)

    @magic_arguments()
    @argument("target", nargs="?", help="host to list (default: the current session's)")
    @argument("--local", action="store_true", help="list kernels on this machine")
    @argument("--json", action="store_true", help="print JSON")
    @line_magic
    @_user_errors
    def colab_kernels(self, line: str = ""):
        """List the kernels running on a host (they outlive disconnects); attach with --attach.

        Example: ``%colab_kernels gpu-box``
        """
        args = parse_argstring(self.colab_kernels, line)
        from colabmagic.connection import make_transport

        if args.target is None and not args.local and registry.names():
            transport = registry.get().transport
            rows = transport.list_kernels()
        else:
            transport = make_transport(args.target, local=args.local or args.target is None)
            try:
                rows = transport.list_kernels()
            finally:
                transport.close()
        if args.json:
            print(json.dumps(rows, indent=1))
            return None
        return _Table(rows, ["id", "state", "kernel_pid", "attached", "started", "cwd"])

    @magic_arguments()
    @argument("name", nargs="?", help="session name (default: the current one)")
    @argument("--keep", action="store_true", help="leave the remote kernel running")
    @line_magic
    @_user_errors
    def colab_disconnect(self, line: str = ""):
        """Disconnect a session; its kernel is shut down unless --keep.

        Example: ``%colab_disconnect --keep`` (then later ``%colab_connect HOST --attach ID``)
        """
        args = parse_argstring(self.colab_disconnect, line)
        session = registry.remove(registry.get(args.name).name)
        session.close(keep=args.keep)
        self.started.discard(session.name)
        kept = f" (kernel {session.kernel_id} keeps running)" if args.keep else ""
        print(f"disconnected {session.name!r}{kept}")


def _start_note(session) -> str | None:
    """What happened before the session's kernel answered (a Jupyter server's restart on
    arrival), or None."""
    note = getattr(session.transport, "start_note", None)
    return note(session.kernel_id) if note is not None else None


def _delivery(session) -> str:
    """How output survives drops for *session*: the agent's log, or a Jupyter server's mode."""
    delivery = getattr(session.transport, "delivery", None)
    if delivery is None:
        return "exactly-once (agent log)"
    return delivery(session.kernel_id) or "starting"
