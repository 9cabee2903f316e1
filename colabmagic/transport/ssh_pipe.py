"""Bulk byte streams over the OpenSSH client: ``ssh HOST COMMAND`` as a subprocess.

paramiko frames, encrypts and copies every 32 KiB packet in Python (sshd caps a session
channel's packets there), which costs this side about twice the CPU of OpenSSH's ``ssh`` for
the same bytes. For bulk file copies (:mod:`colabmagic.filecopy`) the ``ssh`` binary carries
the stream instead, its stdin/stdout being the helper's; the frames on it are the same.

Its command line is built from what the :class:`~colabmagic.transport.ssh.SSHTransport`
already resolved, written to a private ``ssh_config`` (``-F``, so neither the user's nor the
system's config adds anything): every hop's HostName, Port, User, IdentityFile(s),
IdentitiesOnly, the ProxyCommand or the jump chain (``ProxyJump`` between the hops),
ServerAlive*, a ConnectTimeout, and ``BatchMode yes`` so it can never prompt. Host keys: the
``ssh`` client trusts exactly the keys that this transport's own connection verified (from
known_hosts, a ``colab://`` pin or ``--accept-new-host-key``), written to a private
known_hosts under a ``HostKeyAlias`` per hop with ``StrictHostKeyChecking yes``; any other key
fails with :class:`~colabmagic.errors.HostKeyError`. AES-GCM goes first (what paramiko is told
to prefer too): with AES-NI it costs both ends less than OpenSSH's default ChaCha20.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any

from colabmagic.errors import HostKeyError

log = logging.getLogger("colabmagic.ssh")

CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)
# What the key type a transport verified allows OpenSSH to negotiate (RSA keys sign with SHA-2).
_ALGOS = {"ssh-rsa": "rsa-sha2-512,rsa-sha2-256"}
# Exit status of ``ssh`` itself failing (connect, authentication, host key): the command never ran.
SSH_FAILED = 255

_routes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transport -> OpenSSHRoute
_lock = threading.Lock()


def ssh_binary() -> str | None:
    """The OpenSSH client on PATH, or None."""
    return shutil.which("ssh")


def _quote(value: str) -> str:
    """A config value: ``%`` escaped (ssh expands tokens), quoted when it has blanks."""
    value = value.replace("%", "%%")
    return f'"{value}"' if any(c.isspace() for c in value) else value


class OpenSSHRoute:
    """The ``ssh`` command lines that reach *transport*'s host, and their private files.

    Parameters
    ----------
    transport
        A connected (or connectable) :class:`~colabmagic.transport.ssh.SSHTransport`: its
        connection is opened if need be, to learn the host keys it verified.
    ssh
        The ``ssh`` binary.
    """

    def __init__(self, transport: Any, ssh: str):
        self.ssh = ssh
        self.target = transport.target
        self.disabled: str | None = None  # why ssh cannot be used for this transport
        conn = transport.connection()
        self.dir = tempfile.mkdtemp(prefix="colabmagic-ssh-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.config = os.path.join(self.dir, "ssh_config")
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        hops = transport.hops
        keys = [t.get_remote_server_key() for t in conn.transports]
        self.host = f"colabmagic-hop-{len(hops) - 1}"
        lines, known = [], []
        for i, (hop, key) in enumerate(zip(hops, keys, strict=True)):
            alias = f"colabmagic-hop-{i}"
            timeout = max(1, round(hop.connect_timeout or transport.connect_timeout))
            known.append(f"{alias} {key.get_name()} {key.get_base64()}\n")
            lines += [
                f"Host {alias}",
                f"  HostName {_quote(hop.hostname)}",
                f"  Port {hop.port}",
                f"  User {_quote(hop.user)}",
                f"  HostKeyAlias {alias}",
                f"  HostKeyAlgorithms {_ALGOS.get(key.get_name(), key.get_name())}",
                f"  ServerAliveInterval {max(1, round(hop.alive_interval))}",
                f"  ServerAliveCountMax {max(1, hop.alive_count)}",
                f"  ConnectTimeout {timeout}",
            ]
            lines += [f"  IdentityFile {_quote(p)}" for p in hop.identity_files]
            if hop.identities_only:
                lines.append("  IdentitiesOnly yes")
            if i == 0 and hop.proxy_command:
                lines.append(f"  ProxyCommand {hop.proxy_command.replace('%', '%%')}")
            elif i > 0:
                lines.append(f"  ProxyJump colabmagic-hop-{i - 1}")
        lines += [
            "Host *",
            "  BatchMode yes",
            "  StrictHostKeyChecking yes",
            f"  UserKnownHostsFile {_quote(self.known_hosts)}",
            "  GlobalKnownHostsFile /dev/null",
            "  UpdateHostKeys no",
            "  CheckHostIP no",
            "  ControlMaster no",
            "  ControlPath none",
            "  ForwardAgent no",
            "  ForwardX11 no",
            "  ClearAllForwardings yes",
            "  RequestTTY no",
            "  EscapeChar none",  # a binary stream: no ~. in it is ever a command
            "  PasswordAuthentication no",
            "  KbdInteractiveAuthentication no",
            "  Compression no",
            f"  Ciphers {CIPHERS}",
            "  LogLevel ERROR",
        ]
        _write(self.config, "\n".join(lines) + "\n")
        _write(self.known_hosts, "".join(known))

    def argv(self, command: str) -> list[str]:
        """``ssh`` running the remote shell *command* (one string, quoted for the shell)."""
        return [self.ssh, "-F", self.config, "-T", self.host, command]

    def failure(self, returncode: int | None, stderr: str) -> str:
        """Why an ``ssh`` run ended before its command answered; raises
        :class:`~colabmagic.errors.HostKeyError` when OpenSSH refused the host key."""
        text = stderr.strip()
        if "host key verification failed" in text.lower() or "IDENTIFICATION HAS CHANGED" in text:
            msg = (
                f"the host key that ssh was shown for {self.target} is not the one this session "
                "verified: someone may be intercepting the connection, or the host was "
                "reinstalled; verify its key and reconnect (%colab_connect)"
            )
            raise HostKeyError(msg)
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("@")]
        why = lines[-1] if lines else "no output"
        return f"ssh exited with status {returncode}: {why}"

    def close(self) -> None:
        """Remove the private config and known_hosts."""
        self._finalizer()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def route(transport: Any) -> OpenSSHRoute | None:
    """*transport*'s OpenSSH route: None for a transport that is not SSH, when ``ssh`` is not
    on PATH, or once it was found not to work where paramiko does (:func:`disable`)."""
    if not hasattr(transport, "hops"):
        return None
    ssh = ssh_binary()
    if ssh is None:
        return None
    with _lock:
        found = _routes.get(transport)
    if found is not None:
        return None if found.disabled else found
    made = OpenSSHRoute(transport, ssh)  # may connect: outside the lock
    with _lock:
        found = _routes.setdefault(transport, made)
    if found is not made:
        made.close()
    return None if found.disabled else found


def usable(transport: Any) -> bool:
    """Whether ``ssh`` is on PATH and not found failing for *transport* (connects nothing)."""
    if ssh_binary() is None:
        return False
    with _lock:
        found = _routes.get(transport)
    return found is None or not found.disabled


def disable(transport: Any, why: str) -> None:
    """Use paramiko for *transport*'s copies from now on (``ssh`` failed where it worked)."""
    with _lock:
        found = _routes.get(transport)
    if found is not None and not found.disabled:
        found.disabled = why
        log.warning(
            "ssh is not used for %s: file copies go through paramiko, push/pull through the "
            "comm: %s",
            transport.target,
            why,
        )


def close(transport: Any) -> None:
    """Forget *transport*'s route and remove its files (from the transport's ``close``)."""
    with _lock:
        found = _routes.pop(transport, None)
    if found is not None:
        with contextlib.suppress(OSError):
            found.close()
