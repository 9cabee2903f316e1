"""A real OpenSSH ``sshd`` on 127.0.0.1 for tests and benchmarks.

:class:`SSHServer` starts ``sshd -D -e -f CONFIG`` with its own host key, an authorized client
key, a ``known_hosts`` file and an ``ssh_config`` (alias ``Host NAME``) in a private directory,
waits until it answers with an SSH banner, and stops it (and every connection it serves) on
:meth:`SSHServer.stop`. Nothing here touches ``~/.ssh``.

:func:`python_without_colabmagic` makes an interpreter that has ipykernel but cannot import
colabmagic (the "zero-install" remote of the tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from colabmagic.colab import answers_ssh, keygen, sftp_server, sshd_path
from colabmagic.testing import wait_until

__all__ = ["SSHServer", "python_without_colabmagic", "sshd_path"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes(*, ppid: int | None = None, pgid: int | None = None) -> list[int]:
    """Live (non-zombie) processes with parent *ppid* and/or process group *pgid* (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        if (ppid is None or int(fields[1]) == ppid) and (pgid is None or int(fields[2]) == pgid):
            out.append(int(name))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class SSHServer:
    """An OpenSSH server on 127.0.0.1 with everything it needs in one temporary directory.

    Parameters
    ----------
    name
        The ``Host`` alias written to :attr:`ssh_config`.
    directory
        Where keys and configuration go (default: a fresh temporary directory, removed on stop).
    client_key
        Reuse this private key as the authorized client key (its ``.pub`` must exist).
    extra_config
        Lines appended to ``sshd_config``.
    """

    def __init__(
        self,
        name: str = "box",
        *,
        directory: str | None = None,
        client_key: str | None = None,
        extra_config: str = "",
    ):
        self.name = name
        self._own_dir = directory is None
        self.dir = directory or tempfile.mkdtemp(prefix=f"colabmagic-sshd-{name}-")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.host_key = os.path.join(self.dir, "host_ed25519")
        self.client_key = client_key or os.path.join(self.dir, "id_ed25519")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        self.ssh_config = os.path.join(self.dir, "ssh_config")
        self.sshd_config = os.path.join(self.dir, "sshd_config")
        self.user = os.environ.get("USER") or _user()
        self.extra_config = extra_config
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "sshd.log")

    # -- lifetime ----------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> SSHServer:
        """Generate keys, write the configuration, start sshd and wait for its banner."""
        sshd = sshd_path()
        if sshd is None:
            msg = "OpenSSH sshd is not installed (apt-get install openssh-server)"
            raise FileNotFoundError(msg)
        if not os.path.exists(self.host_key):
            keygen(self.host_key, f"colabmagic-test-host-{self.name}")
        if not os.path.exists(self.client_key):
            keygen(self.client_key, "colabmagic-test-client")
        with open(self.client_key + ".pub") as f:
            pub = f.read().strip()
        with open(os.path.join(self.dir, "authorized_keys"), "w") as f:
            f.write(pub + "\n")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        last_error = ""
        for _ in range(5):  # the free port can be taken between probing and binding
            self.port = _free_port()
            self._write_configs()
            self._write_known_hosts()
            logf = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", self.sshd_config],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    start_new_session=True,
                )
            finally:
                logf.close()
            if self._wait_banner(timeout):
                return self
            last_error = self._log_tail()
            self._kill()
        msg = f"sshd did not start on 127.0.0.1: {last_error}"
        raise RuntimeError(msg)

    def _wait_banner(self, timeout: float) -> bool:
        """True once sshd greets on its port; False if it exits or stays silent."""
        try:
            wait_until(
                lambda: self.proc.poll() is not None or answers_ssh(self.port),
                timeout=timeout,
                interval=0.02,
                what=f"sshd's banner on port {self.port}",
            )
        except TimeoutError:
            return False
        return self.proc.poll() is None

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-1000:].strip()
        except OSError:
            return ""

    def _write_configs(self) -> None:
        root_login = "yes" if os.geteuid() == 0 else "no"
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {os.path.join(self.dir, 'sshd.pid')}",
            f"AuthorizedKeysFile {os.path.join(self.dir, 'authorized_keys')}",
            "UsePAM no",
            "StrictModes no",
            f"PermitRootLogin {root_login}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "AllowTcpForwarding yes",
            "MaxSessions 64",
            "MaxStartups 64",
            "LogLevel ERROR",
            f"Subsystem sftp {sftp_server()}",
            self.extra_config,
        ]
        with open(self.sshd_config, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.ssh_config, "w") as f:
            f.write(self.config_block())

    def config_block(self, name: str | None = None, **extra: str) -> str:
        """A ``Host`` block for this server (extra options as keyword arguments)."""
        opts = {
            "HostName": "127.0.0.1",
            "Port": str(self.port),
            "User": self.user,
            "IdentityFile": self.client_key,
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": self.known_hosts,
            **extra,
        }
        body = "".join(f"    {k} {v}\n" for k, v in opts.items())
        return f"Host {name or self.name}\n{body}"

    def config_via(self, port: int, name: str = "wan") -> str:
        """An ssh config file with the alias *name* reaching this server through 127.0.0.1:*port*
        (e.g. a :class:`~colabmagic.testing_wan.WanRelay` in front of it), its host key known
        under that address. Returns the config's path."""
        known = os.path.join(self.dir, f"known_hosts_{name}")
        with open(known, "w") as f:
            f.write(self.host_key_line(f"[127.0.0.1]:{port}") + "\n")
        path = os.path.join(self.dir, f"ssh_config_{name}")
        with open(path, "w") as f:
            f.write(self.config_block(name, Port=str(port), UserKnownHostsFile=known))
        return path

    def host_key_line(self, hostname: str | None = None) -> str:
        """The ``known_hosts`` line for this server's host key."""
        with open(self.host_key + ".pub") as f:
            kind, b64 = f.read().split()[:2]
        host = hostname or f"[127.0.0.1]:{self.port}"
        return f"{host} {kind} {b64}"

    def _write_known_hosts(self) -> None:
        with open(self.known_hosts, "w") as f:
            f.write(self.host_key_line() + "\n")

    def connection_pids(self) -> list[int]:
        """The sshd processes serving connections now (children of the listener)."""
        if self.proc is None:
            return []
        out, todo = [], [self.proc.pid]
        while todo:
            for child in processes(ppid=todo.pop()):
                if _comm(child).startswith("sshd"):
                    out.append(child)
                    todo.append(child)
        return out

    def kill_connections(self) -> list[int]:
        """SIGKILL every sshd process serving a connection (the listener keeps running)."""
        pids = self.connection_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def _kill(self) -> None:
        if self.proc is None:
            return
        self.kill_connections()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop sshd and every connection it serves; remove the directory if it made it."""
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ssh_transport(server: SSHServer, root, **kw):
    """An :class:`~colabmagic.transport.ssh.SSHTransport` to *server* as the tests use it: its
    alias (or ``alias=``) and ssh_config (or ``ssh_config=``), this Python, agents under *root*,
    a 10 s connect timeout; other keywords pass through."""
    from colabmagic.transport.ssh import SSHTransport

    kw.setdefault("ssh_config", server.ssh_config)
    kw.setdefault("connect_timeout", 10)
    return SSHTransport(kw.pop("alias", server.name), python=sys.executable, root=str(root), **kw)


def locked_key_config(server: SSHServer, directory, passphrase: str) -> str:
    """An ssh_config for *server* whose only key has *passphrase*: paramiko can ask for it, the
    OpenSSH client in BatchMode cannot (keep the key out of any agent: unset SSH_AUTH_SOCK)."""
    key = os.path.join(str(directory), "locked")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", key], check=True)
    with open(os.path.join(server.dir, "authorized_keys"), "a") as f, open(key + ".pub") as pub:
        f.write(pub.read())
    cfg = os.path.join(str(directory), "config")
    with open(cfg, "w") as f:
        f.write(server.config_block(IdentityFile=key))
    return cfg


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def python_without_colabmagic(dest: str, *, base: str | None = None) -> str:
    """An interpreter that has ipykernel (and the rest of *base*'s packages) but no colabmagic.

    A bare virtual environment (no pip: fast) whose ``.pth`` file adds a directory of symlinks
    to everything in *base*'s site-packages except colabmagic itself, so ``import colabmagic``
    fails there exactly as on a fresh GPU host. Returns the interpreter's path.
    """
    python = os.path.join(dest, "venv", "bin", "python")
    if os.path.exists(python):
        return python
    base = base or sys.executable
    site = _purelib(base)
    farm = os.path.join(dest, "site")
    os.makedirs(farm, exist_ok=True)
    for name in os.listdir(site):
        low = name.lower()
        if low.startswith(("colabmagic", "__editable__")) or low.endswith(".pth"):
            continue
        link = os.path.join(farm, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(site, name), link)
    subprocess.run(
        [base, "-m", "venv", "--without-pip", os.path.join(dest, "venv")],
        check=True,
        capture_output=True,
    )
    with open(os.path.join(_purelib(python), "zz_colabmagic_test_site.pth"), "w") as f:
        f.write(farm + "\n")
    return python


def _purelib(python: str) -> str:
    """The site-packages directory of the interpreter *python*."""
    return subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
