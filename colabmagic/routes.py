"""The ``colab://`` connect line and the tunnel clients that reach a runtime.

:func:`colabmagic.colab.serve` prints one line, e.g.::

    %colab_connect colab://root@quiet-lake-1234.trycloudflare.com?via=cloudflared&fp=SHA256:Ab...

It carries the user, the *route* (how the local side reaches the runtime's sshd) and the SHA256
fingerprints of the runtime's host keys, and no secret: access comes from the user's public key,
which the runtime authorized. Locally the line alone connects; the pinned keys are the only keys
accepted for that route (``~/.ssh/known_hosts`` is neither read nor written), and nothing is written
to ``~/.ssh`` unless the user asks for it (:func:`save`).

Routes (``via=``):

- ``cloudflared``: a Cloudflare quick tunnel name; the local ssh connection runs
  ``cloudflared access ssh --hostname NAME`` as its ProxyCommand (cloudflared must be on PATH);
- ``tailscale``: a tailnet host name (``HOST[:PORT]``), reached directly;
- ``ngrok``: an ngrok TCP address ``HOST:PORT``, reached directly;
- ``direct``: ``HOST[:PORT]`` reachable as it is (a cloud VM, a lab box).
"""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import re
import shlex
import shutil
from dataclasses import dataclass, field

from colabmagic.errors import ConnectError, ParameterError

SCHEME = "colab://"
MAGIC = "%colab_connect"
ROUTES = ("cloudflared", "tailscale", "ngrok", "direct")
#: The port our private sshd listens on by default (serve's default), for routes without one.
DEFAULT_PORT = 22
_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$")
_HOST_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_FP_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_EXAMPLE = "colab://root@NAME.trycloudflare.com?via=cloudflared&fp=SHA256:..."


def fingerprint_of(public_key: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a ``type base64 [comment]`` public key line."""
    parts = public_key.split()
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (IndexError, ValueError):
        shown = public_key[:40]
        msg = f"{shown!r} is not an OpenSSH public key line ('ssh-ed25519 AAAA...')"
        raise ParameterError(msg) from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Route:
    """Where a runtime's sshd is, how to get there, and which host keys it must present.

    Attributes
    ----------
    user
        The login name on the runtime.
    via
        One of :data:`ROUTES`.
    host
        The tunnel name, tailnet name, ngrok host or plain host.
    port
        The TCP port (ignored by ``cloudflared``: the tunnel reaches sshd).
    fingerprints
        ``SHA256:...`` of each host key of the runtime's sshd.
    """

    user: str
    via: str
    host: str
    port: int = DEFAULT_PORT
    fingerprints: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.via not in ROUTES:
            msg = f"route via={self.via!r} is unknown; use one of {', '.join(ROUTES)}"
            raise ParameterError(msg)
        if not _USER_RE.match(self.user):
            msg = f"user {self.user!r} is not a valid login name"
            raise ParameterError(msg)
        if not (_HOST_RE.match(self.host) or _is_ip(self.host)):
            msg = f"host {self.host!r} is not a valid host name or address"
            raise ParameterError(msg)
        if not 0 < self.port < 65536:
            msg = f"port {self.port} must be between 1 and 65535"
            raise ParameterError(msg)
        if not self.fingerprints:
            msg = "a colab:// route needs the host key fingerprint(s) (fp=SHA256:...)"
            raise ParameterError(msg)
        bad = [f for f in self.fingerprints if not _FP_RE.match(f)]
        if bad:
            msg = f"{bad[0]!r} is not a host key fingerprint; expected SHA256: + 43 characters"
            raise ParameterError(msg)

    @property
    def address(self) -> str:
        """``host`` or ``host:port`` (``[v6]:port``) as it appears in the line."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.via == "cloudflared" or self.port == DEFAULT_PORT:
            return host
        return f"{host}:{self.port}"

    @property
    def target(self) -> str:
        """``user@host[:port]``, the SSH target this route dials."""
        return f"{self.user}@{self.address}"

    def line(self) -> str:
        """The ``colab://`` URL (no secret in it)."""
        return f"{SCHEME}{self.target}?via={self.via}&fp={','.join(self.fingerprints)}"

    def connect_line(self) -> str:
        """``%colab_connect colab://...``: what to paste into the local notebook."""
        return f"{MAGIC} {self.line()}"

    def proxy_command(self, *, which=shutil.which) -> str | None:
        """The ProxyCommand that reaches the runtime, or None for a direct TCP route.

        Raises
        ------
        ConnectError
            The route is ``cloudflared`` and ``cloudflared`` is not on PATH (says how to install).
        """
        if self.via != "cloudflared":
            return None
        binary = which("cloudflared")
        if binary is None:
            raise ConnectError(install_hint())
        return f"{shlex.quote(binary)} access ssh --hostname {shlex.quote(self.host)}"

    def transport_options(self) -> dict:
        """Keyword arguments for :class:`~colabmagic.transport.ssh.SSHTransport`."""
        options: dict = {"pinned_host_keys": list(self.fingerprints)}
        command = self.proxy_command()
        if command:
            options["proxy_command"] = command
        return options

    def __str__(self) -> str:
        return self.line()


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_line(text: str | None) -> bool:
    """True when *text* is (or starts like) a ``colab://`` line, with or without the magic."""
    if not text:
        return False
    text = text.strip()
    if text.startswith(MAGIC):
        text = text[len(MAGIC) :].strip()
    return text.lower().startswith(SCHEME)


def _bad(text: str, why: str) -> ParameterError:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return ParameterError(
        f"{shown!r} is not a valid colab:// line ({why}); paste the whole line serve() printed, "
        f"e.g. {_EXAMPLE}"
    )


def parse(text: str) -> Route:
    """The :class:`Route` of a ``colab://`` line (the ``%colab_connect`` prefix is optional).

    Raises
    ------
    ParameterError
        One line naming what is wrong (scheme, user, route, host, port or fingerprints).
    """
    raw = (text or "").strip()
    body = raw[len(MAGIC) :].strip() if raw.startswith(MAGIC) else raw
    if not body.lower().startswith(SCHEME):
        raise _bad(raw, "it must start with colab://")
    rest = body[len(SCHEME) :]
    if any(c.isspace() for c in rest):
        raise _bad(raw, "it contains spaces")
    where, sep, query = rest.partition("?")
    if not sep:
        raise _bad(raw, "the ?via=...&fp=... part is missing")
    user, at, address = where.rstrip("/").rpartition("@")
    if not at or not user:
        raise _bad(raw, "the user@ part is missing")
    params: dict[str, str] = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not eq or key not in ("via", "fp") or key in params:
            raise _bad(raw, f"unexpected parameter {item!r}")
        params[key] = value
    if "via" not in params or "fp" not in params:
        raise _bad(raw, "both via= and fp= are needed")
    host, port = _split_address(address, raw)
    try:
        return Route(
            user=user,
            via=params["via"],
            host=host,
            port=DEFAULT_PORT if port is None else port,
            fingerprints=tuple(f for f in params["fp"].split(",") if f),
        )
    except ParameterError as exc:
        raise _bad(raw, str(exc)) from None


def _split_address(address: str, raw: str) -> tuple[str, int | None]:
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise _bad(raw, f"bad address {address!r}")
    else:
        host, _, port = address.partition(":")
    if not host:
        raise _bad(raw, "the host is missing")
    if port and not port.isdigit():
        raise _bad(raw, f"port {port!r} is not a number")
    return host, int(port) if port else None


# -- the cloudflared client ------------------------------------------------------------------
CLOUDFLARED_RELEASES = "https://github.com/cloudflare/cloudflared/releases/latest"


def install_hint(system: str | None = None, machine: str | None = None) -> str:
    """One line: cloudflared is missing here, and how to install it on this OS."""
    system = (system or platform.system()).lower()
    machine = (machine or platform.machine()).lower()
    if system == "darwin":
        how = "brew install cloudflared"
    elif system == "windows":
        how = "winget install --id Cloudflare.cloudflared"
    else:
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            machine, machine
        )
        how = (
            f"curl -fsSL -o ~/.local/bin/cloudflared {CLOUDFLARED_RELEASES}/download/"
            f"cloudflared-linux-{arch} && chmod +x ~/.local/bin/cloudflared"
        )
    return (
        f"cloudflared is not installed on this machine (the colab:// route goes through a "
        f"Cloudflare tunnel); install it with: {how} -- then make sure it is on PATH and retry"
    )


# -- --save ALIAS: a Host block and a known_hosts line, on request only ----------------------
_BEGIN = "# >>> colabmagic {alias} >>>"
_END = "# <<< colabmagic {alias} <<<"


def ssh_config_block(route: Route, alias: str) -> str:
    """The ``Host ALIAS`` block that reaches *route* with plain ``ssh ALIAS``."""
    lines = [f"Host {alias}", f"    HostName {route.host}", f"    User {route.user}"]
    if route.via == "cloudflared":
        lines.append("    ProxyCommand cloudflared access ssh --hostname %h")
    elif route.port != 22:
        lines.append(f"    Port {route.port}")
    lines.append("    ServerAliveInterval 15")
    return "\n".join(lines) + "\n"


def known_hosts_name(route: Route) -> str:
    """How ``known_hosts`` names the route's host (``[host]:port`` off port 22)."""
    port = 22 if route.via == "cloudflared" else route.port
    return route.host if port == 22 else f"[{route.host}]:{port}"


def save(
    route: Route,
    alias: str,
    host_key: str,
    *,
    ssh_config: str = "~/.ssh/config",
    known_hosts: str = "~/.ssh/known_hosts",
) -> tuple[str, str]:
    """Write a ``Host ALIAS`` block and the verified host key, so ``ssh ALIAS`` works later.

    *host_key* is ``type base64`` of the key the runtime presented (and that matched the pin). A
    block this function wrote before for *alias* is replaced; any other ``Host ALIAS`` is left
    alone and refused. Old ``known_hosts`` lines for the same host name are replaced.

    Returns
    -------
    tuple of str
        The two files written.
    """
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", alias):
        msg = f"--save alias {alias!r} must use letters, digits, '.', '-' and '_'"
        raise ParameterError(msg)
    if fingerprint_of(host_key) not in route.fingerprints:
        msg = f"refusing to save a host key that the line does not pin ({fingerprint_of(host_key)})"
        raise ParameterError(msg)
    cfg = os.path.expanduser(ssh_config)
    kh = os.path.expanduser(known_hosts)
    os.makedirs(os.path.dirname(cfg), mode=0o700, exist_ok=True)
    text = _read(cfg)
    begin, end = _BEGIN.format(alias=alias), _END.format(alias=alias)
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() == begin:
            skipping = True
        elif skipping and line.strip() == end:
            skipping = False
        elif not skipping:
            if re.match(rf"^\s*Host\s+(.*\s)?{re.escape(alias)}(\s|$)", line):
                msg = (
                    f"~/.ssh/config already has a 'Host {alias}' entry that colabmagic did not "
                    "write; pick another --save alias or remove that entry"
                )
                raise ParameterError(msg)
            kept.append(line)
    body = "".join(kept)
    if body and not body.endswith("\n"):
        body += "\n"
    body += f"{begin}\n{ssh_config_block(route, alias)}{end}\n"
    _write(cfg, body)
    name = known_hosts_name(route)
    key = " ".join(host_key.split()[:2])
    lines = [ln for ln in _read(kh).splitlines(keepends=True) if ln.split(" ", 1)[0] != name]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    _write(kh, "".join(lines) + f"{name} {key}\n")
    return cfg, kh


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _write(path: str, text: str) -> None:
    tmp = f"{path}.colabmagic-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_verified(route: Route, alias: str, transport) -> tuple[str, str]:
    """:func:`save` with the host key *transport* has just verified against the pins."""
    key = transport.connection().transport.get_remote_server_key()
    return save(route, alias, f"{key.get_name()} {key.get_base64()}")
