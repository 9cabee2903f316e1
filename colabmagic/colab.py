"""GPU-host side: make this machine (a Colab runtime, a cloud VM) reachable by ``%colab_connect``.

:func:`serve` installs OpenSSH's server when it is missing (apt), authorizes your public key,
starts a private ``sshd`` (its own host key and config under ``~/.colabmagic/sshd``, key
authentication only), optionally opens a Cloudflare quick tunnel (``tunnel="cloudflared"``:
Colab runtimes accept no inbound connections), and returns a :class:`ServeInfo` whose text is
the ``~/.ssh/config`` block, the ``known_hosts`` line and the ``%colab_connect`` line to use on
your own machine. In a notebook cell, the returned object displays itself; ``colabmagic serve``
prints it.

Note: Colab's terms restrict SSH and remote proxies on free-of-charge runtimes; use a paid
(Colab Pro) runtime or any machine you are allowed to run sshd on.
"""

from __future__ import annotations

import base64
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from colabmagic.errors import ConnectError, ParameterError

STATE_DIR = "~/.colabmagic/sshd"
TUNNELS = ("none", "cloudflared")
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
SFTP_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
CLOUDFLARED_URL = "https://github.com/cloudflare/cloudflared/releases/latest/download/"
_TUNNEL_RE = re.compile(r"https://([-a-z0-9]+\.trycloudflare\.com)")


@dataclass
class ServeInfo:
    """What the local side needs to connect; ``str()`` is the text to paste."""

    alias: str
    host: str
    port: int
    user: str
    host_keys: list[str] = field(default_factory=list)
    proxy_command: str | None = None
    sshd_pid: int | None = None
    tunnel_pid: int | None = None

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def ssh_config(self) -> str:
        """The ``Host`` block for ``~/.ssh/config`` on the local machine."""
        lines = [f"Host {self.alias}", f"    HostName {self.host}", f"    User {self.user}"]
        if self.port != 22:
            lines.append(f"    Port {self.port}")
        if self.proxy_command:
            lines.append(f"    ProxyCommand {self.proxy_command}")
        lines.append("    ServerAliveInterval 15")
        return "\n".join(lines) + "\n"

    def known_hosts(self) -> str:
        """Lines for the local ``~/.ssh/known_hosts`` (then no --accept-new-host-key is needed)."""
        return "".join(f"{self.known_hosts_name} {k}\n" for k in self.host_keys)

    def connect_line(self) -> str:
        return f"%colab_connect {self.alias}"

    def __str__(self) -> str:
        return (
            "# 1. add to ~/.ssh/config on your machine:\n"
            f"{self.ssh_config()}\n"
            "# 2. add to ~/.ssh/known_hosts (this host's key; or connect once with "
            "--accept-new-host-key after checking the fingerprint):\n"
            f"{self.known_hosts()}\n"
            "# 3. in your notebook:\n"
            "%load_ext colabmagic\n"
            f"{self.connect_line()}\n"
        )

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(str(self))


def check_public_key(key: str) -> str:
    """Return the ``type base64 [comment]`` line of *key* (a key or a ``.pub`` file path)."""
    text = key.strip()
    if text and os.path.exists(os.path.expanduser(text)):
        with open(os.path.expanduser(text)) as f:
            text = f.read().strip()
    parts = text.split()
    ok = len(parts) >= 2 and parts[0] in KEY_TYPES
    if ok:
        try:
            base64.b64decode(parts[1], validate=True)
        except ValueError:
            ok = False
    if not ok:
        shown = text[:40] + ("..." if len(text) > 40 else "")
        msg = (
            f"public_key {shown!r} is not an OpenSSH public key; give the contents of your "
            "~/.ssh/id_ed25519.pub (or its path)"
        )
        raise ParameterError(msg)
    return " ".join(parts[:3])


def authorize_key(public_key: str, authorized_keys: str = "~/.ssh/authorized_keys") -> bool:
    """Append *public_key* to *authorized_keys* (0600 in a 0700 dir) unless present."""
    line = check_public_key(public_key)
    path = os.path.expanduser(authorized_keys)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    blob = line.split()[1]
    if os.path.exists(path):
        with open(path) as f:
            if any(blob in existing.split() for existing in f):
                return False
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
    os.chmod(path, 0o600)
    return True


def sshd_path() -> str | None:
    """The ``sshd`` binary, or None when OpenSSH's server is not installed."""
    return shutil.which("sshd") or next((p for p in SSHD_CANDIDATES if os.path.exists(p)), None)


def sftp_server() -> str:
    """OpenSSH's ``sftp-server``, or sshd's built-in ``internal-sftp`` when it is absent."""
    return next((p for p in SFTP_CANDIDATES if os.path.exists(p)), "internal-sftp")


def keygen(path: str, comment: str) -> None:
    """Write a new unencrypted ed25519 key pair to *path* and *path*.pub."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
        check=True,
        capture_output=True,
    )


def answers_ssh(port: int, host: str = "127.0.0.1") -> bool:
    """True when *host*:*port* accepts a connection and greets with an SSH banner."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def sshd_binary(*, install: bool = True) -> str:
    """Path of ``sshd``, installing ``openssh-server`` with apt when missing (and allowed)."""
    found = sshd_path()
    if found:
        return found
    if not install:
        msg = "sshd is not installed; install openssh-server (or run serve with install=True)"
        raise ConnectError(msg)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        msg = "sshd is missing and cannot be installed here (needs root and apt-get); install it"
        raise ConnectError(msg)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], apt_install_command()):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            msg = f"{' '.join(cmd)} failed: {tail}"
            raise ConnectError(msg)
    found = sshd_path()
    if not found:
        msg = "openssh-server was installed but sshd is still not found"
        raise ConnectError(msg)
    return found


def apt_install_command() -> list[str]:
    return ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"]


def sshd_config_text(
    state_dir: str,
    *,
    port: int,
    listen: str,
    authorized_keys: str,
    options: dict[str, str] | None = None,
) -> str:
    """Our private sshd's configuration: key authentication only, loopback-only when tunnelled."""
    return "\n".join(
        [
            f"Port {port}",
            f"ListenAddress {listen}",
            f"HostKey {os.path.join(state_dir, 'ssh_host_ed25519_key')}",
            f"PidFile {os.path.join(state_dir, 'sshd.pid')}",
            f"AuthorizedKeysFile {authorized_keys}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "AllowTcpForwarding yes",
            "X11Forwarding no",
            "ClientAliveInterval 15",
            "ClientAliveCountMax 4",
            f"Subsystem sftp {sftp_server()}",
            *(f"{k} {v}" for k, v in (options or {}).items()),
            "",
        ]
    )


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def start_sshd(
    state_dir: str,
    *,
    port: int,
    listen: str,
    authorized_keys: str,
    install: bool = True,
    options: dict[str, str] | None = None,
) -> int | None:
    """Write the config and host key, start sshd (it daemonizes); return its pid."""
    sshd = sshd_binary(install=install)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    key = os.path.join(state_dir, "ssh_host_ed25519_key")
    if not os.path.exists(key):
        keygen(key, "colabmagic-host")
    cfg = os.path.join(state_dir, "sshd_config")
    with open(cfg, "w") as f:
        f.write(
            sshd_config_text(
                state_dir,
                port=port,
                listen=listen,
                authorized_keys=authorized_keys,
                options=options,
            )
        )
    pidfile = os.path.join(state_dir, "sshd.pid")
    pid = _read_pid(pidfile)
    check = "127.0.0.1" if listen in ("0.0.0.0", "::") else listen  # noqa: S104
    if pid and _alive(pid) and answers_ssh(port, check):
        os.kill(pid, signal.SIGHUP)  # re-read the config
        return pid
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    test = subprocess.run([sshd, "-t", "-f", cfg], capture_output=True, text=True, check=False)
    if test.returncode != 0:
        msg = f"sshd rejects its configuration {cfg}: {test.stderr.strip()}"
        raise ConnectError(msg)
    proc = subprocess.run([sshd, "-f", cfg], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"sshd did not start on port {port}: {proc.stderr.strip()}"
        raise ConnectError(msg)
    deadline = time.monotonic() + 10
    while not answers_ssh(port, check):
        if time.monotonic() > deadline:
            msg = f"sshd started but does not answer on {check}:{port}; is the port taken?"
            raise ConnectError(msg)
        time.sleep(0.05)  # waiting for a daemon to listen, bounded by the deadline
    return _read_pid(pidfile)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return True


# -- the Cloudflare quick tunnel (cloudflared runs on the GPU host) --------------------------
def cloudflared_asset(machine: str | None = None) -> str:
    """The release file for this CPU (``cloudflared-linux-amd64`` ...)."""
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        (machine or platform.machine()).lower()
    )
    if arch is None:
        msg = f"no cloudflared build for CPU {machine or platform.machine()!r}; use tunnel='none'"
        raise ParameterError(msg)
    return f"cloudflared-linux-{arch}"


def cloudflared_command(binary: str, port: int) -> list[str]:
    """The quick-tunnel command that exposes the local sshd on a trycloudflare.com name."""
    return [binary, "tunnel", "--no-autoupdate", "--url", f"ssh://localhost:{port}"]


def cloudflared_client_proxy() -> str:
    """ProxyCommand for the *local* ssh config (needs cloudflared installed locally too)."""
    return "cloudflared access ssh --hostname %h"


def parse_tunnel_host(log_text: str) -> str | None:
    """The ``*.trycloudflare.com`` host name announced in cloudflared's log, if any."""
    m = _TUNNEL_RE.search(log_text)
    return m.group(1) if m else None


def _fetch_cloudflared(state_dir: str) -> str:
    found = shutil.which("cloudflared")
    if found:
        return found
    path = os.path.join(state_dir, "cloudflared")
    if not os.path.exists(path):
        import urllib.request

        url = CLOUDFLARED_URL + cloudflared_asset()
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:  # noqa: S310
                shutil.copyfileobj(r, f)
        except OSError as exc:
            msg = f"could not download cloudflared from {url}: {exc}"
            raise ConnectError(msg) from None
        os.chmod(path + ".part", 0o700)
        os.replace(path + ".part", path)
    return path


def start_cloudflared(state_dir: str, port: int, timeout: float = 60.0) -> tuple[str, int]:
    """Start a quick tunnel to the local sshd; return ``(host name, pid)``."""
    binary = _fetch_cloudflared(state_dir)
    log_path = os.path.join(state_dir, "cloudflared.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            cloudflared_command(binary, port),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            host = parse_tunnel_host(f.read())
        if host:
            with open(os.path.join(state_dir, "cloudflared.pid"), "w") as f:
                f.write(str(proc.pid))
            return host, proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.2)  # waiting for the tunnel's announcement, bounded by the deadline
    proc.kill()
    msg = f"cloudflared did not announce a tunnel within {timeout:g}s; see {log_path}"
    raise ConnectError(msg)


def serve(
    public_key: str,
    *,
    port: int = 2222,
    tunnel: str = "none",
    listen: str | None = None,
    host: str | None = None,
    alias: str = "colab",
    user: str | None = None,
    state_dir: str = STATE_DIR,
    authorized_keys: str = "~/.ssh/authorized_keys",
    install: bool = True,
    sshd_options: dict[str, str] | None = None,
) -> ServeInfo:
    """Make this machine reachable over SSH for ``%colab_connect``; see the module docstring.

    Parameters
    ----------
    public_key
        Your (local machine's) OpenSSH public key, or the path of a ``.pub`` file.
    port
        Port of the private sshd (default 2222, leaving any system sshd alone).
    tunnel
        ``"none"`` (the host is reachable directly, e.g. a cloud VM) or ``"cloudflared"`` (a
        Cloudflare quick tunnel; needs ``cloudflared`` locally too).
    listen
        Address sshd binds (default: 127.0.0.1 with a tunnel, 0.0.0.0 without).
    host
        The name the local side uses for this machine (default: the tunnel's, or the FQDN).
    install
        Install ``openssh-server`` with apt when sshd is missing (needs root).
    sshd_options
        Extra ``sshd_config`` lines, e.g. ``{"AllowUsers": "root"}``.

    Returns
    -------
    ServeInfo
        Displays the ``~/.ssh/config`` block, the ``known_hosts`` line and the connect line.

    Examples
    --------
    >>> from colabmagic.colab import serve
    >>> serve("ssh-ed25519 AAAA... me@laptop", tunnel="cloudflared")  # doctest: +SKIP
    """
    if tunnel not in TUNNELS:
        msg = f"tunnel={tunnel!r} is not supported; use one of {', '.join(TUNNELS)}"
        raise ParameterError(msg)
    if not 0 < port < 65536:
        msg = f"port={port} must be between 1 and 65535"
        raise ParameterError(msg)
    state = os.path.expanduser(state_dir)
    listen = listen or ("127.0.0.1" if tunnel != "none" else "0.0.0.0")  # noqa: S104
    keys_file = os.path.expanduser(authorized_keys)
    authorize_key(public_key, keys_file)
    pid = start_sshd(
        state,
        port=port,
        listen=listen,
        authorized_keys=keys_file,
        install=install,
        options=sshd_options,
    )
    with open(os.path.join(state, "ssh_host_ed25519_key.pub")) as f:
        host_key = " ".join(f.read().split()[:2])
    import getpass

    info = ServeInfo(
        alias=alias,
        host=host or socket.getfqdn(),
        port=port,
        user=user or getpass.getuser(),
        host_keys=[host_key],
        sshd_pid=pid,
    )
    if tunnel == "cloudflared":
        info.host, info.tunnel_pid = start_cloudflared(state, port)
        info.port = 22  # the tunnel, not the port, reaches sshd
        info.proxy_command = cloudflared_client_proxy()
    return info


def stop(state_dir: str = STATE_DIR) -> list[int]:
    """Stop the sshd (and tunnel) that :func:`serve` started; returns the pids signalled."""
    state = os.path.expanduser(state_dir)
    stopped = []
    for name in ("sshd.pid", "cloudflared.pid"):
        pid = _read_pid(os.path.join(state, name))
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped
