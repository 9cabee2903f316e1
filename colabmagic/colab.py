"""GPU-host side: make this machine (a Colab runtime, a cloud VM) reachable by ``%colab_connect``.

:func:`serve` installs OpenSSH's server when it is missing (apt), authorizes your public key,
starts a private ``sshd`` (its own host key and config under ``~/.colabmagic/sshd``, key
authentication only), optionally opens a tunnel (``tunnel="cloudflared"``: Colab runtimes
accept no inbound connections; or names a tailscale/ngrok route), and returns a
:class:`ServeInfo` whose text is one line, ``%colab_connect colab://...`` (user, route, host key
fingerprints; see :mod:`colabmagic.routes`), which alone connects from your own machine. In a
notebook cell, the returned object displays itself with a copy button; ``colabmagic serve``
prints it.

Note: Colab's terms restrict SSH and remote proxies on free-of-charge runtimes; use a paid
(Colab Pro) runtime or any machine you are allowed to run sshd on.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from colabmagic import routes
from colabmagic.errors import ConnectError, ParameterError

STATE_DIR = "~/.colabmagic/sshd"
TUNNELS = ("none", "cloudflared", "tailscale", "ngrok")
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
    """What the local side needs to connect; ``str()`` is the one line to paste.

    In a notebook it displays that line with a copy button; elsewhere as plain text.
    """

    alias: str
    host: str
    port: int
    user: str
    host_keys: list[str] = field(default_factory=list)
    proxy_command: str | None = None
    sshd_pid: int | None = None
    tunnel_pid: int | None = None
    via: str = "direct"
    sshd_port: int | None = None  # where sshd listens here (port is what the route dials)

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def fingerprints(self) -> list[str]:
        """``SHA256:...`` of each host key (what the connect line pins)."""
        return [routes.fingerprint_of(k) for k in self.host_keys]

    def route(self) -> routes.Route:
        """The :class:`~colabmagic.routes.Route` the connect line describes."""
        return routes.Route(
            user=self.user,
            via=self.via,
            host=self.host,
            port=self.port,
            fingerprints=tuple(self.fingerprints),
        )

    def ssh_config(self) -> str:
        """A ``Host`` block for ``~/.ssh/config`` (``%colab_connect LINE --save ALIAS`` writes
        it)."""
        return routes.ssh_config_block(self.route(), self.alias)

    def known_hosts(self) -> str:
        """Lines for the local ``~/.ssh/known_hosts`` (``--save`` writes them too)."""
        name = routes.known_hosts_name(self.route())
        return "".join(f"{name} {k}\n" for k in self.host_keys)

    def connect_line(self) -> str:
        """``%colab_connect colab://...``: user, route and pinned host keys; no secret."""
        return self.route().connect_line()

    def __str__(self) -> str:
        return self.connect_line()

    def _repr_pretty_(self, p, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        line = self.connect_line()
        js = f"navigator.clipboard.writeText({json.dumps(line)});this.textContent='copied'"
        return (
            '<div style="font-family:monospace">'
            "<div>Paste this line into your local notebook:</div>"
            f'<code style="user-select:all;word-break:break-all">{html.escape(line)}</code> '
            f'<button onclick="{html.escape(js, quote=True)}">copy</button></div>'
        )


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
        Your (local machine's) OpenSSH public key, or the path of a ``.pub`` file
        (``%colab_connect --print-key`` prints it).
    port
        Port of the private sshd (default 2222, leaving any system sshd alone).
    tunnel
        How your machine reaches this one: ``"none"`` (directly, e.g. a cloud VM),
        ``"cloudflared"`` (a Cloudflare quick tunnel, started here; the local side runs
        ``cloudflared access ssh``), ``"tailscale"`` (this machine's tailnet name) or ``"ngrok"``
        (an ``ngrok tcp PORT`` tunnel you started; its address is read from ngrok's local API,
        or give it as ``host="0.tcp.ngrok.io:12345"``).
    listen
        Address sshd binds (default: 127.0.0.1 with cloudflared or ngrok, else 0.0.0.0).
    host
        The name the local side dials (default: the tunnel's, the tailnet name, or the FQDN).
    alias
        The ``Host`` alias of :meth:`ServeInfo.ssh_config`.
    install
        Install ``openssh-server`` with apt when sshd is missing (needs root).
    sshd_options
        Extra ``sshd_config`` lines, e.g. ``{"AllowUsers": "root"}``.

    Returns
    -------
    ServeInfo
        Displays the one ``%colab_connect colab://...`` line to paste into your notebook.

    Examples
    --------
    >>> from colabmagic.colab import serve
    >>> serve("ssh-ed25519 AAAA... me@laptop", tunnel="cloudflared")  # doctest: +SKIP
    %colab_connect colab://root@quiet-lake-1234.trycloudflare.com?via=cloudflared&fp=SHA256:...
    """
    if tunnel not in TUNNELS:
        msg = f"tunnel={tunnel!r} is not supported; use one of {', '.join(TUNNELS)}"
        raise ParameterError(msg)
    if not 0 < port < 65536:
        msg = f"port={port} must be between 1 and 65535"
        raise ParameterError(msg)
    state = os.path.expanduser(state_dir)
    behind = tunnel in ("cloudflared", "ngrok")
    listen = listen or ("127.0.0.1" if behind else "0.0.0.0")  # noqa: S104
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
    import getpass

    info = ServeInfo(
        alias=alias,
        host=host or socket.getfqdn(),
        port=port,
        user=user or getpass.getuser(),
        host_keys=host_keys(state),
        sshd_pid=pid,
        sshd_port=port,
        via="direct" if tunnel == "none" else tunnel,
    )
    if tunnel == "cloudflared":
        info.host, info.tunnel_pid = start_cloudflared(state, port)
        info.port = 22  # the tunnel, not the port, reaches sshd
        info.proxy_command = cloudflared_client_proxy()
    elif tunnel == "tailscale":
        info.host = host or tailscale_name()
    elif tunnel == "ngrok":
        info.host, info.port = _split_host_port(host) if host else ngrok_address(port)
    info.route()  # validates host/port now, on the runtime, not later on the user's machine
    return info


def host_keys(state_dir: str) -> list[str]:
    """``type base64`` of each host key of our sshd (what the connect line pins)."""
    keys = []
    for name in sorted(os.listdir(state_dir)):
        if name.startswith("ssh_host_") and name.endswith("_key.pub"):
            with open(os.path.join(state_dir, name)) as f:
                keys.append(" ".join(f.read().split()[:2]))
    return keys


def _split_host_port(address: str) -> tuple[str, int]:
    name, _, port = address.removeprefix("tcp://").rpartition(":")
    if not name or not port.isdigit():
        msg = f"host={address!r} must be the ngrok address HOST:PORT, e.g. 0.tcp.ngrok.io:12345"
        raise ParameterError(msg)
    return name, int(port)


def tailscale_name(run=subprocess.run) -> str:
    """This machine's tailnet DNS name (``tailscale status --json``: ``Self.DNSName``)."""
    if shutil.which("tailscale") is None:
        msg = "tailscale is not installed here; install and `tailscale up` first, or give host="
        raise ConnectError(msg)
    proc = run(["tailscale", "status", "--json"], capture_output=True, text=True, check=False)
    try:
        name = json.loads(proc.stdout)["Self"]["DNSName"].rstrip(".")
    except (ValueError, KeyError, TypeError):
        name = ""
    if proc.returncode != 0 or not name:
        msg = "tailscale is not up here (tailscale status failed); run `tailscale up` or give host="
        raise ConnectError(msg)
    return name


def ngrok_address(port: int, api: str = "http://127.0.0.1:4040/api/tunnels") -> tuple[str, int]:
    """The public ``(host, port)`` of the ``ngrok tcp PORT`` tunnel running here."""
    import urllib.request

    try:
        with urllib.request.urlopen(api, timeout=5) as r:  # noqa: S310 - loopback API
            tunnels = json.load(r).get("tunnels", [])
    except (OSError, ValueError):
        tunnels = []
    for t in tunnels:
        url, addr = t.get("public_url", ""), str(t.get("config", {}).get("addr", ""))
        if url.startswith("tcp://") and addr.rsplit(":", 1)[-1] == str(port):
            return _split_host_port(url)
    msg = f"no ngrok TCP tunnel to port {port} is running here; start `ngrok tcp {port}` first"
    raise ConnectError(msg)


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
