"""One authenticated SSH connection: targets, ``~/.ssh/config``, host keys, keys, jump hosts.

:func:`resolve` turns what the user typed (``[user@]host[:port]`` or an alias) plus options into
a chain of :class:`Hop` (jump hosts first, the destination last), honouring HostName, User,
Port, IdentityFile, IdentitiesOnly, ProxyCommand, ProxyJump, ServerAliveInterval/CountMax,
ConnectTimeout and UserKnownHostsFile. :func:`open_connection` connects through that chain
(a direct-tcpip channel per jump), verifies every host key strictly (unknown: refused unless
``accept_new``; changed: always refused), authenticates with ssh-agent and key files (asking
for passphrases with :mod:`getpass`) and tunes the paramiko transport for speed and to avoid
paramiko's re-key stall. Every library exception is translated here into
:class:`~colabmagic.errors.ConnectError` / :class:`~colabmagic.errors.HostKeyError`.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paramiko

from colabmagic.errors import ConnectError, HostKeyError, ParameterError

log = logging.getLogger("colabmagic.ssh")

DEFAULT_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
DEFAULT_ALIVE_INTERVAL = 10.0
DEFAULT_ALIVE_COUNT = 3
# Fast AEAD ciphers first (paramiko's default, aes128-ctr, is markedly slower).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
WINDOW_SIZE = 8 << 20
MAX_PACKET = 1 << 15
# paramiko re-keys every 512 MiB and can deadlock if a channel closes meanwhile (paramiko #822);
# OpenSSH re-keys AES-GCM after gigabytes anyway, so paramiko never has to start one.
REKEY_LIMIT = 1 << 60


@dataclass
class Hop:
    """One SSH server on the way to the target (the last hop is the target)."""

    alias: str
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: list[str] = field(default_factory=list)
    identities_only: bool = False
    known_hosts: list[str] = field(default_factory=list)
    proxy_command: str | None = None
    alive_interval: float = DEFAULT_ALIVE_INTERVAL
    alive_count: int = DEFAULT_ALIVE_COUNT
    connect_timeout: float | None = None
    pinned: list[str] = field(default_factory=list)  # SHA256 fingerprints: only these, no files

    @property
    def known_hosts_name(self) -> str:
        """How ``known_hosts`` names this host (``host`` on port 22, else ``[host]:port``)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _invalid_target(target: str) -> ParameterError:
    return ParameterError(
        f"ssh target {target!r} is not valid; give [user@]host[:port] or a ~/.ssh/config alias"
    )


def split_target(target: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (or ``[user@][v6addr]:port``) -> ``(user, host, port)``."""
    if not target or any(c.isspace() for c in target) or target.startswith("-"):
        raise _invalid_target(target)
    if target.startswith("ssh://"):
        target = target[len("ssh://") :].rstrip("/")
    user, _, hostport = target.rpartition("@")
    port: str | None = None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host = hostport
    if not host or (port is not None and not port.isdigit()):
        raise _invalid_target(target)
    return user or None, host, int(port) if port else None


def _load_config(path: str | None) -> paramiko.SSHConfig:
    path = os.path.expanduser(path or DEFAULT_CONFIG)
    if not os.path.exists(path):
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(path)
    except (OSError, ValueError, paramiko.ConfigParseError) as exc:
        msg = f"cannot read the ssh config {path}: {exc}; fix the file or pass ssh_config=None"
        raise ParameterError(msg) from exc


def _yes(value: str | None) -> bool:
    return str(value or "").lower() in ("yes", "true")


def _hop(
    spec: str,
    cfg: paramiko.SSHConfig,
    *,
    user: str | None = None,
    port: int | None = None,
    identity: str | None = None,
) -> tuple[Hop, dict]:
    """One hop from a target spec, its config entry and explicit options (which win)."""
    t_user, host, t_port = split_target(spec)
    entry = cfg.lookup(host)
    known = entry.get("userknownhostsfile")
    known_files = [os.path.expanduser(p) for p in known.split()] if known else []
    if not known_files:
        known_files = [os.path.expanduser(p) for p in DEFAULT_KNOWN_HOSTS]
    identities = [os.path.expanduser(p) for p in entry.get("identityfile", [])]
    if identity:
        identities.insert(0, os.path.expanduser(identity))
    hop = Hop(
        alias=host,
        hostname=entry.get("hostname", host),
        port=port or t_port or int(entry.get("port", 22)),
        user=user or t_user or entry.get("user") or getpass.getuser(),
        identity_files=identities,
        identities_only=_yes(entry.get("identitiesonly")),
        known_hosts=known_files,
        alive_interval=float(entry.get("serveraliveinterval", 0)) or DEFAULT_ALIVE_INTERVAL,
        alive_count=int(entry.get("serveralivecountmax", DEFAULT_ALIVE_COUNT)),
        connect_timeout=float(entry["connecttimeout"]) if "connecttimeout" in entry else None,
    )
    return hop, entry


def resolve(
    target: str,
    *,
    port: int | None = None,
    identity: str | None = None,
    proxy_command: str | None = None,
    ssh_config: str | None = None,
) -> list[Hop]:
    """The chain of hops to *target*: ProxyJump hosts first, the target last.

    Explicit options win over ``user@``/``:port`` in the target, which win over the config.
    """
    cfg = _load_config(ssh_config)
    dest, entry = _hop(target, cfg, port=port, identity=identity)
    command = proxy_command or entry.get("proxycommand")
    if command and command.lower() != "none":
        dest.proxy_command = _expand_tokens(command, dest)
        return [dest]
    jump = entry.get("proxyjump")
    chain: list[Hop] = []
    if jump and jump.lower() != "none":
        specs = [s.strip() for s in jump.split(",") if s.strip()]
        if len(specs) > 8:
            msg = f"ProxyJump for {target!r} has {len(specs)} hops; at most 8 are supported"
            raise ParameterError(msg)
        first = specs[0]
        if split_target(first)[1] == dest.alias:
            msg = f"ProxyJump of {target!r} points at itself; fix ~/.ssh/config"
            raise ParameterError(msg)
        chain = resolve(first, ssh_config=ssh_config)
        for spec in specs[1:]:
            chain.append(_hop(spec, cfg)[0])
    return [*chain, dest]


def _expand_tokens(command: str, hop: Hop) -> str:
    # paramiko expands config tokens already; an explicit --proxy gets the same treatment here.
    return (
        command.replace("%h", hop.hostname)
        .replace("%p", str(hop.port))
        .replace("%r", hop.user)
        .replace("%%", "%")
    )


# -- host keys -------------------------------------------------------------------------------
def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _key_label(key: paramiko.PKey) -> str:
    name = key.get_name()
    kind = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}.get(name, name.split("-")[0].upper())
    if name.startswith("ecdsa"):
        kind = "ECDSA"
    return f"{kind} {fingerprint(key)}"


def _short(path: str) -> str:
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if path.startswith(home + os.sep) else path


def _known_keys(hop: Hop) -> tuple[dict[str, paramiko.PKey], dict[str, str]]:
    """The recorded keys for *hop* by key type, and the file each came from."""
    keys: dict[str, paramiko.PKey] = {}
    origin: dict[str, str] = {}
    for path in [*hop.known_hosts, *GLOBAL_KNOWN_HOSTS]:
        if not os.path.exists(path):
            continue
        hk = paramiko.HostKeys()
        try:
            hk.load(path)
        except (OSError, paramiko.SSHException) as exc:
            log.warning("ignoring unreadable known_hosts file %s: %s", path, exc)
            continue
        found = hk.lookup(hop.known_hosts_name)
        if found:
            for kind in found.keys():
                if kind not in keys:
                    keys[kind] = found[kind]
                    origin[kind] = path
    return keys, origin


_ALGOS_FOR_TYPE = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


def _prefer_known_key_types(t: paramiko.Transport, known: dict[str, paramiko.PKey]) -> None:
    """Ask the server for a host key type we have recorded (as OpenSSH does)."""
    if not known:
        return
    opts = t.get_security_options()
    first = []
    for kind in known:
        first += [a for a in _ALGOS_FOR_TYPE.get(kind, (kind,)) if a in opts.key_types]
    if first:
        opts.key_types = tuple(first) + tuple(k for k in opts.key_types if k not in first)


def verify_host_key(key: paramiko.PKey, hop: Hop, known: dict, origin: dict, *, accept_new: bool):
    """Accept *key* if recorded, record it if new and *accept_new*, refuse otherwise.

    A hop with pinned fingerprints (a ``colab://`` line) accepts exactly those keys and never
    looks at or writes ``known_hosts``.
    """
    if hop.pinned:
        verify_pinned(key, hop)
        return
    recorded = known.get(key.get_name())
    if recorded is not None and recorded == key:
        return
    if known:
        where = _short(origin.get(key.get_name()) or next(iter(origin.values())))
        msg = (
            f"WARNING: the host key of {hop.alias} ({hop.known_hosts_name}) has CHANGED to "
            f"{_key_label(key)}, not the one in {where}: someone may be intercepting the "
            f"connection (man-in-the-middle); if the host was reinstalled, verify the new key, "
            f"remove the old one with ssh-keygen -R '{hop.known_hosts_name}' -f {where}, "
            "and reconnect."
        )
        raise HostKeyError(msg)
    target = hop.known_hosts[0]
    if not accept_new:
        msg = (
            f"Host key for {hop.alias} ({hop.known_hosts_name}, {_key_label(key)}) is not in "
            f"{_short(target)}; verify it and rerun with --accept-new-host-key."
        )
        raise HostKeyError(msg)
    record_host_key(target, hop.known_hosts_name, key)


def verify_pinned(key: paramiko.PKey, hop: Hop) -> None:
    """Accept *key* only if its fingerprint is one of ``hop.pinned``; else say both."""
    if fingerprint(key) in hop.pinned:
        return
    msg = (
        f"Host key mismatch for {hop.alias}: it presented {_key_label(key)}, but the colab:// "
        f"line pins {', '.join(hop.pinned)}; this is not the runtime that printed the line (it "
        "was recycled, or someone is intercepting): run serve() there again and paste its new line"
    )
    raise HostKeyError(msg)


def record_host_key(path: str, name: str, key: paramiko.PKey) -> None:
    """Append ``name keytype base64`` to a known_hosts file (created 0600 in a 0700 dir)."""
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    log.info("recorded the host key of %s in %s", name, path)


# -- authentication --------------------------------------------------------------------------
def ask_passphrase(path: str) -> str:
    """Ask for a key's passphrase on the terminal (or the notebook's stdin)."""
    return getpass.getpass(f"Enter passphrase for key '{_short(path)}': ")


def _load_key(path: str, passphrase: Callable[[str], str]) -> paramiko.PKey | None:
    if not os.path.exists(path):
        return None
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):
        pass  # paramiko 5 lets cryptography's TypeError through for encrypted OpenSSH keys
    except (paramiko.SSHException, OSError, ValueError) as exc:
        log.info("skipping key %s: %s", path, exc)
        return None
    for _ in range(3):
        try:
            return paramiko.PKey.from_path(path, passphrase(path).encode())
        except (paramiko.SSHException, ValueError, TypeError):
            continue
    msg = f"wrong passphrase for {_short(path)} (3 tries); load it into ssh-agent or retry"
    raise ConnectError(msg)


def _agent_keys() -> list[paramiko.PKey]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        return list(paramiko.Agent().get_keys())
    except (paramiko.SSHException, OSError) as exc:
        log.info("ssh-agent not usable: %s", exc)
        return []


def _candidate_keys(hop: Hop, passphrase: Callable[[str], str]):
    """Keys to offer, lazily (an encrypted key's passphrase is asked only when reached)."""
    agent = _agent_keys()
    files = hop.identity_files or [os.path.expanduser(p) for p in DEFAULT_KEYS]
    if not hop.identities_only:
        for key in agent:
            yield "ssh-agent", key
    by_blob = {k.asbytes(): k for k in agent}
    for path in files:
        pub = path + ".pub"
        if hop.identities_only and os.path.exists(pub):
            try:
                with open(pub) as f:
                    blob = base64.b64decode(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                blob = b""
            if blob in by_blob:
                yield f"ssh-agent ({_short(path)})", by_blob[blob]
                continue
        key = _load_key(path, passphrase)
        if key is not None:
            yield _short(path), key


def authenticate(t: paramiko.Transport, hop: Hop, passphrase: Callable[[str], str]) -> None:
    """Public-key authentication with agent keys and key files; ConnectError if none works."""
    tried: list[str] = []
    for label, key in _candidate_keys(hop, passphrase):
        tried.append(label)
        try:
            t.auth_publickey(hop.user, key)
        except paramiko.BadAuthenticationType as exc:
            msg = (
                f"{hop} does not accept public keys (it allows {', '.join(exc.allowed_types)}); "
                "colabmagic needs key authentication: add your public key to the host's "
                "~/.ssh/authorized_keys"
            )
            raise ConnectError(msg) from None
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, OSError) as exc:
            msg = f"authentication with {hop} failed: {exc}"
            raise ConnectError(msg) from exc
        if t.is_authenticated():
            return
    keys = ", ".join(tried) if tried else "none found"
    msg = (
        f"Permission denied (publickey) for {hop} (keys tried: {keys}); add your public key to "
        "the host's ~/.ssh/authorized_keys or give the right one with -i/--identity."
    )
    raise ConnectError(msg)


# -- connecting ------------------------------------------------------------------------------
def _tune(t: paramiko.Transport) -> None:
    opts = t.get_security_options()
    avail = opts.ciphers
    opts.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in avail) + tuple(
        c for c in avail if c not in PREFERRED_CIPHERS
    )
    pk = t.packetizer
    pk.REKEY_BYTES = pk.REKEY_PACKETS = REKEY_LIMIT
    pk.REKEY_BYTES_OVERFLOW_MAX = pk.REKEY_PACKETS_OVERFLOW_MAX = REKEY_LIMIT


def _tcp(hop: Hop, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((hop.hostname, hop.port), timeout=timeout)
    except socket.gaierror as exc:
        msg = (
            f"Could not resolve host {hop.hostname!r} ({exc.strerror or exc}); it is neither a "
            f"known name nor a Host alias in {_short(os.path.expanduser(DEFAULT_CONFIG))}."
        )
        raise ConnectError(msg) from None
    except UnicodeError:
        msg = (
            f"Could not resolve host {hop.hostname!r} (not a valid host name); check the "
            "target or the Host alias in ~/.ssh/config."
        )
        raise ConnectError(msg) from None
    except ConnectionRefusedError:
        msg = (
            f"Connection refused by {hop.hostname}:{hop.port}; is sshd running there, "
            "and is the port right (-p/--port)?"
        )
        raise ConnectError(msg) from None
    except TimeoutError:
        msg = (
            f"Timed out after {timeout:g}s connecting to {hop.hostname}:{hop.port}; check the "
            "host and port, or raise --connect-timeout."
        )
        raise ConnectError(msg) from None
    except OSError as exc:
        msg = (
            f"Cannot reach {hop.hostname}:{hop.port}: {exc.strerror or exc}; check the network "
            "and the host name (try ssh -v TARGET)."
        )
        raise ConnectError(msg) from None
    _nodelay(sock)
    return sock


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class Connection:
    """An authenticated SSH connection to the last hop of a chain (see :func:`open_connection`).

    Attributes
    ----------
    transport
        The paramiko transport to the target; exec channels and SFTP all ride on it.
    """

    def __init__(self, hops: list[Hop]):
        self.hops = hops
        self.transports: list[paramiko.Transport] = []
        self.proxy: paramiko.ProxyCommand | None = None
        self._stop = threading.Event()
        self.opened = time.monotonic()

    @property
    def transport(self) -> paramiko.Transport:
        return self.transports[-1]

    @property
    def active(self) -> bool:
        return bool(self.transports) and all(t.is_active() for t in self.transports)

    def start_keepalive(self) -> None:
        """Probe the server every ServerAliveInterval; close the connection when it is dead."""
        hop = self.hops[-1]
        threading.Thread(
            target=self._keepalive,
            args=(hop.alive_interval, max(1, hop.alive_count)),
            name=f"colabmagic-ssh-keepalive-{hop.alias}",
            daemon=True,
        ).start()

    def _keepalive(self, interval: float, count: int) -> None:
        t = self.transport
        while not self._stop.wait(interval):
            if not t.is_active():
                return
            answered = threading.Event()

            def probe(t=t, answered=answered) -> None:
                with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                    t.global_request("keepalive@openssh.com", wait=True)
                answered.set()

            threading.Thread(target=probe, daemon=True).start()
            if not answered.wait(interval * count) and not self._stop.is_set():
                log.info("ssh to %s: no answer for %gs; closing", self.hops[-1], interval * count)
                self.close()
                return

    def close(self) -> None:
        self._stop.set()
        for t in reversed(self.transports):
            with contextlib.suppress(Exception):
                t.close()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()


class ProxyCommand(paramiko.ProxyCommand):
    """paramiko's ProxyCommand, except that the command's exit ends the connection.

    paramiko's ``recv`` spins on an empty read until its timeout and reports a timeout, so a
    tunnel client that died (``cloudflared`` losing its tunnel) went unnoticed until keepalive
    gave up; here end of file is end of file and the link's reconnect starts at once.
    """

    def recv(self, size: int) -> bytes:
        start = time.monotonic()
        out = self.process.stdout
        while True:
            wait = None if self.timeout is None else self.timeout - (time.monotonic() - start)
            if wait is not None and wait <= 0:
                raise TimeoutError()
            try:
                ready, _, _ = select.select([out], [], [], wait)
                if ready:
                    return os.read(out.fileno(), size)  # b"" at EOF: paramiko sees the end
            except OSError as exc:
                raise paramiko.ProxyCommandFailure(" ".join(self.cmd), exc.strerror) from None


def open_connection(
    hops: list[Hop],
    *,
    timeout: float,
    accept_new_host_key: bool = False,
    passphrase: Callable[[str], str] = ask_passphrase,
) -> Connection:
    """Connect through every hop of *hops* within *timeout* seconds; see the module docstring."""
    conn = Connection(hops)
    deadline = time.monotonic() + timeout
    try:
        for i, hop in enumerate(hops):
            left = max(0.5, deadline - time.monotonic())
            if hop.connect_timeout:
                left = min(left, hop.connect_timeout)
            if i == 0 and hop.proxy_command:
                try:
                    conn.proxy = ProxyCommand(hop.proxy_command)
                except (OSError, paramiko.SSHException) as exc:
                    msg = f"ProxyCommand {hop.proxy_command!r} for {hop.alias} failed: {exc}"
                    raise ConnectError(msg) from None
                sock = conn.proxy
            elif i == 0:
                sock = _tcp(hop, left)
            else:
                sock = _through(conn.transport, hops[i - 1], hop, left)
            conn.transports.append(_handshake(sock, hop, left, accept_new_host_key, passphrase))
    except BaseException:
        conn.close()
        raise
    conn.start_keepalive()
    return conn


def _through(t: paramiko.Transport, jump: Hop, hop: Hop, timeout: float):
    try:
        return t.open_channel(
            "direct-tcpip",
            (hop.hostname, hop.port),
            ("127.0.0.1", 0),
            window_size=WINDOW_SIZE,
            max_packet_size=MAX_PACKET,
            timeout=timeout,
        )
    except paramiko.ChannelException as exc:
        msg = (
            f"Jump host {jump.alias} could not reach {hop.hostname}:{hop.port} ({exc.text}); "
            "check the target's HostName/Port as the jump host sees them."
        )
        raise ConnectError(msg) from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        msg = f"Jump host {jump.alias} dropped the connection to {hop.hostname}: {exc}"
        raise ConnectError(msg) from None


def _handshake(sock, hop: Hop, timeout: float, accept_new: bool, passphrase) -> paramiko.Transport:
    t = paramiko.Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET
    )
    t.banner_timeout = t.handshake_timeout = t.auth_timeout = timeout
    t.set_log_channel(f"colabmagic.ssh.paramiko.{hop.alias}")
    _tune(t)
    known, origin = ({}, {}) if hop.pinned else _known_keys(hop)
    _prefer_known_key_types(t, known)
    try:
        t.start_client(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        t.close()
        if isinstance(exc, paramiko.SSHException) and "banner" in str(exc).lower():
            msg = (
                f"{hop.hostname}:{hop.port} ({hop.alias}) did not answer like an SSH server "
                f"within {timeout:g}s; check the port (-p/--port) and any ProxyCommand."
            )
        else:
            msg = f"SSH handshake with {hop.alias} ({hop.hostname}:{hop.port}) failed: {exc}"
        raise ConnectError(msg) from None
    try:
        verify_host_key(t.get_remote_server_key(), hop, known, origin, accept_new=accept_new)
        authenticate(t, hop, passphrase)
    except BaseException:
        t.close()
        raise
    return t
