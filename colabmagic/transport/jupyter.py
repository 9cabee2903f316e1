"""The Jupyter-server transport: kernels on any Jupyter server (jupyter_server >= 2, JupyterHub).

``%colab_connect https://host[:port]/base/`` (``http://`` only on 127.0.0.0/8). No SSH: kernels
are started, listed, interrupted, restarted and deleted through the server's REST API, and each
pipe the proxy asks for is a socket pair whose far end is a :class:`~.jupyter_link.KernelLink`
speaking the wire protocol to the proxy and the kernel websocket to the server. The proxy, the
Session, the provisioner and ``%%gpu_run`` run unchanged on top.

**The token** comes from the environment variable *token_env* (default ``JUPYTER_TOKEN``), else
from keyring (service ``colabmagic``, user = the server URL) when keyring is installed, else from a
prompt (getpass). It is sent only in the ``Authorization: token ...`` header; it is never read from
the URL's query (a URL carrying one is refused) and never appears in an error, a log record, a
repr or a kernelspec file.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from colabmagic.errors import ConnectError, ParameterError
from colabmagic.proxy import PermanentLinkError
from colabmagic.transport import jupyter_lane, jupyter_start
from colabmagic.transport.jupyter_link import V1, Inbox, KernelLink

log = logging.getLogger("colabmagic.jupyter")

DEFAULT_TOKEN_ENV = "JUPYTER_TOKEN"  # noqa: S105 - the variable's name, not a token
KEYRING_SERVICE = "colabmagic"
_MAX_MESSAGE = 1 << 34


def is_server_url(target: str | None) -> bool:
    """True when *target* names a Jupyter server (``http(s)://...``)."""
    return bool(target) and target.lower().startswith(("http://", "https://"))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:
        return False


def parse_server_url(url: str) -> str:
    """The normalized base URL (``scheme://host[:port]/base/``), or a one-line ParameterError.

    Refuses a query or fragment (a token there would end up in logs and shell history) and plain
    ``http`` outside 127.0.0.0/8. The messages never repeat the query.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        msg = f"{url.split('?')[0]!r} is not a valid server URL ({exc})"
        raise ParameterError(msg) from None
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    if parts.query or parts.fragment:
        msg = (
            f"remove the query from the server URL ({shown}): a token belongs in the "
            f"{DEFAULT_TOKEN_ENV} environment variable (or --token-env VAR), never in the URL"
        )
        raise ParameterError(msg)
    if parts.username or parts.password:
        msg = f"remove the user:password@ part from the server URL ({shown}); use a token"
        raise ParameterError(msg)
    if parts.scheme not in ("http", "https") or not host:
        msg = f"{shown!r} is not a Jupyter server URL; give https://host[:port]/base/"
        raise ParameterError(msg)
    if parts.scheme == "http" and not _loopback(host):
        msg = (
            f"plain http to {host} would send the token unencrypted; use https:// "
            "(http is allowed only on 127.0.0.0/8)"
        )
        raise ParameterError(msg)
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host:
        netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"{parts.scheme}://{netloc}{path}"


class TokenRefused(ConnectError):
    """The server (or the Hub) refused the token: retrying cannot help."""


class ServerGone(ConnectError):
    """JupyterHub answered for a single-user server that no longer runs (HTTP 424)."""


def hub_root(base: str) -> str | None:
    """For a JupyterHub single-user URL (``.../user/NAME/``) the Hub's own URL (``.../hub/``);
    None for any other server."""
    parts = urllib.parse.urlsplit(base)
    prefix, sep, rest = parts.path.rpartition("/user/")
    if not sep or rest.count("/") != 1 or not rest.endswith("/"):
        return None
    return f"{parts.scheme}://{parts.netloc}{prefix}/hub/"


def _covers(scopes: list[str], base: str) -> bool:
    """Whether JupyterHub *scopes* grant access to the single-user server at *base*."""
    user = urllib.parse.unquote(urllib.parse.urlsplit(base).path.rstrip("/").rpartition("/")[2])
    granted = {"access:servers", f"access:servers!user={user}", f"access:servers!server={user}/"}
    return bool(granted & set(scopes))


class Token:
    """A secret that stays out of reprs, logs and tracebacks' locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def header(self) -> str:
        return f"token {self._value}"

    def __repr__(self) -> str:
        return "Token(<hidden>)"

    __str__ = __repr__

    def __reduce__(self):
        msg = "a server token is not picklable"
        raise TypeError(msg)


def resolve_token(url: str, *, token_env: str | None = None, prompt: bool = True) -> Token:
    """The server token: from ``$token_env``, else keyring, else a getpass prompt."""
    env = token_env or DEFAULT_TOKEN_ENV
    value = os.environ.get(env)
    if not value:
        value = _from_keyring(url)
    can_prompt = prompt and _can_prompt()
    if not value and can_prompt:
        import getpass

        try:
            value = getpass.getpass(f"Token for {url}: ")
        except (EOFError, OSError):
            value = None
    if not value:
        msg = (
            f"no token for {url}{'' if can_prompt else ' (and no terminal to ask on)'}: set {env} "
            f"(or name another variable with --token-env), or store it with keyring "
            f"(keyring set {KEYRING_SERVICE} {url})"
        )
        raise ConnectError(msg)
    return Token(value.strip())


def _from_keyring(url: str) -> str | None:
    """The token stored under service ``colabmagic``, user = the base URL (with or without its
    final slash); None without keyring or a usable backend."""
    try:
        import keyring

        for user in (url, url.rstrip("/")):
            value = keyring.get_password(KEYRING_SERVICE, user)
            if value:
                return value
    except Exception:  # noqa: BLE001, S110 - no keyring, or no backend: fall through
        pass
    return None


def _can_prompt() -> bool:
    """A person can answer: a terminal, or an IPython kernel (its getpass asks the frontend)."""
    import getpass
    import sys

    if getpass.getpass.__module__ != "getpass":
        return True
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the server's origin: urllib would resend the Authorization
    header to any host (even from https to http), so a redirect elsewhere is refused instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            scheme, host, port = _origin(newurl)
            shown = f"{scheme}://{host}" + (f":{port}" if port else "")
            msg = (
                f"{req.full_url.split('?')[0]} redirected to {shown} (HTTP {code}); "
                "colabmagic sends the token only to the server's own origin"
            )
            raise TokenRefused(msg)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


class _Rest:
    """Blocking REST calls with the token in the Authorization header (used from threads)."""

    def __init__(self, base: str, token: Token, timeout: float):
        self.base = base
        self._token = token
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict | None = None,
        raw: bool = False,
        timeout: float | None = None,
    ) -> Any:
        url = self.base + path.lstrip("/")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) only
        req.add_header("Authorization", self._token.header())
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        shown = f"{method} {self.base}{path.lstrip('/').split('?')[0]}"
        try:
            with _OPENER.open(req, timeout=timeout or self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (401, 403):
                raise TokenRefused(self.refused(shown, exc.code)) from None
            if exc.code == 404:
                msg = f"{shown}: not found (HTTP 404)"
                raise FileNotFoundError(msg) from None
            if exc.code == 424:  # JupyterHub: "server no longer running"
                raise ServerGone(self.gone()) from None
            msg = f"{shown}: HTTP {exc.code} {exc.reason}"
            raise ConnectError(msg) from None
        except ConnectError:  # a redirect off the server's origin (an OSError too)
            raise
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException: a response cut mid-body (IncompleteRead) is a lost connection too
            reason = getattr(exc, "reason", exc)
            msg = f"cannot reach {self.base} ({reason})"
            raise ConnectError(msg) from None
        if raw:
            return payload
        return json.loads(payload) if payload else None

    def refused(self, shown: str, code: int) -> str:
        """The one line for a refused token; on JupyterHub, asks the Hub what is wrong with it."""
        hub = hub_root(self.base)
        if hub is None:
            return f"{shown}: the server refused the token (HTTP {code}); check the token"
        page = hub + "token"
        req = urllib.request.Request(hub + "api/user", method="GET")  # noqa: S310 - http(s) only
        req.add_header("Authorization", self._token.header())
        try:
            with _OPENER.open(req, timeout=min(self.timeout, 10.0)) as resp:
                scopes = json.loads(resp.read()).get("scopes", [])
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code not in (401, 403):  # no hub there after all (a server under /user/x/)
                return f"{shown}: the server refused the token (HTTP {code}); check the token"
            return (
                f"{shown}: the hub does not accept this token (HTTP {code}; expired, revoked or "
                f"from another hub); create one with the access:servers scope at {page}"
            )
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
            scopes = []
        if not any(s.startswith("access:servers") for s in scopes):
            return (
                f"{shown}: the token lacks the access:servers scope (HTTP {code}); "
                f"create one at {page}"
            )
        if _covers(scopes, self.base):  # not the token: the Hub refuses for a stopped server
            if self._status_code("api/status") == 424:
                return self.gone()
            return f"{shown}: the hub refused the request (HTTP {code}); is the server running?"
        return (
            f"{shown}: the hub refused the token (HTTP {code}): its access:servers scope does "
            f"not cover this server (another user's?); create one at {page}"
        )

    def _status_code(self, path: str) -> int | None:
        """The HTTP status of a GET (with the token), without any diagnosis; None if unreachable."""
        req = urllib.request.Request(self.base + path, method="GET")  # noqa: S310 - http(s) only
        req.add_header("Authorization", self._token.header())
        try:
            with _OPENER.open(req, timeout=min(self.timeout, 10.0)) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return None

    def gone(self) -> str:
        """The one line for a JupyterHub single-user server that has stopped."""
        where = hub_root(self.base)
        start = f"start it again at {where}home and reconnect" if where else "start it again"
        return (
            f"the JupyterHub server {self.base} is no longer running (stopped or culled), "
            f"and its kernels ended with it; {start}"
        )

    def kernel_model(self, kernel_id: str, timeout: float | None = None) -> dict:
        return self.request("GET", f"api/kernels/{kernel_id}", timeout=timeout)

    def interrupt(self, kernel_id: str) -> None:
        self.request("POST", f"api/kernels/{kernel_id}/interrupt", {})

    def restart(self, kernel_id: str) -> None:
        self.request("POST", f"api/kernels/{kernel_id}/restart", {})

    def delete(self, kernel_id: str, wait: float = 60.0) -> None:
        """DELETE the kernel; return once the server no longer lists it.

        A DELETE that meets one still under way (the link's ``shutdown`` op timed out on a busy
        machine, then the provisioner's stop) gets HTTP 500 from jupyter_server: the kernel is
        then waited for, up to *wait* seconds, and deleted again if it is still there.
        """
        path = f"api/kernels/{kernel_id}"
        try:
            self.request("DELETE", path)
            return
        except FileNotFoundError:
            return
        except (TokenRefused, ServerGone):
            raise
        except ConnectError:
            pass  # another shutdown under way, or a slow server: see whether it ends
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.kernel_model(kernel_id, timeout=10.0)
            except FileNotFoundError:
                return
            time.sleep(0.2)
        with contextlib.suppress(FileNotFoundError):
            self.request("DELETE", path)

    def ws_url(self, kernel_id: str, session_id: str) -> str:
        scheme = "wss" if self.base.startswith("https") else "ws"
        rest = self.base.split("://", 1)[1]
        return f"{scheme}://{rest}api/kernels/{kernel_id}/channels?session_id={session_id}"


class _Loop:
    """One asyncio loop in a daemon thread, shared by the links of a transport."""

    def __init__(self) -> None:
        self.selector = jupyter_lane.HandOffSelector()  # hands messages on just before it blocks
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="colabmagic-jupyter", daemon=True
        )
        self.thread.start()

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class LinkPipe:
    """The proxy's end of a socket pair whose other end a :class:`KernelLink` serves."""

    def __init__(self, transport: JupyterTransport, kernel_id: str):
        self._outer, self.inner = socket.socketpair()
        for s in (self._outer, self.inner):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.inner.setblocking(False)
        self.read_fd = self.write_fd = self._outer.fileno()
        self.description = f"websocket to kernel {kernel_id} on {transport.target}"
        self._transport = transport
        self._kernel_id = kernel_id

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._outer.shutdown(socket.SHUT_RDWR)
        self._outer.close()

    def failure(self) -> tuple[bool, str]:
        link = self._transport.links.get(self._kernel_id)
        reason = link.reason if link is not None else "the link ended"
        try:  # quick: the proxy waits for this answer before it reconnects
            self._transport.rest.kernel_model(self._kernel_id, timeout=3.0)
        except FileNotFoundError:
            return True, f"kernel {self._kernel_id} no longer exists on {self._transport.target}"
        except ServerGone as exc:
            return True, str(exc)
        except ConnectError:
            pass
        return False, reason


class JupyterTransport:
    """Kernels on a Jupyter server; see the module docstring.

    Parameters
    ----------
    url
        ``https://host[:port]/base/`` (JupyterHub: ``https://hub/user/NAME/``); ``http://`` only
        on 127.0.0.0/8.
    token_env
        Environment variable holding the token (default ``JUPYTER_TOKEN``).
    kernel_name
        Kernelspec to start on the server (default: the server's default).
    journal
        Install the kernel-side journal for exactly-once output (default True).
    subprotocol
        ``"auto"`` (offer v1, accept JSON), or ``"json"`` to use the legacy JSON frames.
    ping_interval
        Seconds between websocket pings; two unanswered ones mean a drop (default 10).
    start_timeout
        Seconds a freshly started kernel has to answer (default 20). One that does not is
        deleted and started again once; one that dies as it starts fails at once
        (:mod:`~colabmagic.transport.jupyter_start`).
    """

    def __init__(
        self,
        url: str,
        *,
        token_env: str | None = None,
        kernel_name: str | None = None,
        journal: bool = True,
        subprotocol: str = "auto",
        ping_interval: float = 10.0,
        stable_session: bool = True,
        connect_timeout: float = 30.0,
        start_timeout: float = jupyter_start.DEFAULT_START_TIMEOUT,
        prompt: bool = True,
        token: Token | None = None,
    ):
        self.base = parse_server_url(url)
        self.start_timeout = jupyter_start.validate_timeout(start_timeout)
        self.target = self.base
        if subprotocol not in ("auto", "json"):
            msg = f"subprotocol={subprotocol!r} must be 'auto' or 'json'"
            raise ParameterError(msg)
        self.kernel_name = kernel_name
        self.journal = journal
        self.subprotocol = subprotocol
        self.ping_interval = float(ping_interval)
        self.stable_session = stable_session
        self.connect_timeout = connect_timeout
        self.rest = _Rest(
            self.base,
            token or resolve_token(self.base, token_env=token_env, prompt=prompt),
            connect_timeout,
        )
        self.links: dict[str, KernelLink] = {}
        self.opened: dict[str, tuple] = {}  # a fresh kernel's answered websocket, for open_pipe
        self.arrivals: dict[str, list] = {}  # kernels that did not answer before this one
        self._options: dict[str, dict] = {}
        self._loop: _Loop | None = None

    def __repr__(self) -> str:
        return f"<JupyterTransport {self.base}>"

    # -- kernels ---------------------------------------------------------------------------
    def start_kernel(
        self,
        *,
        mock_gpu: bool = False,
        cwd: str | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        idle_timeout: float | None = None,
    ) -> str:
        """Start a kernel through ``POST /api/kernels``; returns its id once it has answered.

        *cwd* is a path relative to the server's root; *python* is not choosable on a server
        (pick a kernelspec with ``kernel_name``); *idle_timeout* is the server's culling policy.
        A kernel that does not answer within ``start_timeout`` is deleted and started again,
        once; see :mod:`~colabmagic.transport.jupyter_start`.

        Raises
        ------
        KernelDeadOnArrival
            The kernel died as it started, or did not answer twice (one line, token-free).
        """
        if python:
            msg = (
                "a Jupyter server starts the interpreter of a kernelspec: drop --python and "
                "choose the kernelspec with kernel_name=..."
            )
            raise ParameterError(msg)
        body: dict[str, Any] = {}
        if self.kernel_name:
            body["name"] = self.kernel_name
        if cwd:
            body["path"] = cwd
        options = {"mock_gpu": mock_gpu, "env": dict(env or {})}
        return jupyter_start.start(self, body, options)

    def list_kernels(self) -> list[dict]:
        rows = self.rest.request("GET", "api/kernels") or []
        return [
            {
                "id": k["id"],
                "state": k.get("execution_state"),
                "kernel_pid": None,
                "attached": k.get("connections"),
                "started": k.get("last_activity"),
                "cwd": None,
                "name": k.get("name"),
            }
            for k in rows
        ]

    def stop_kernel(self, kernel_id: str) -> None:
        self.rest.delete(kernel_id)
        self.forget(kernel_id)

    def forget(self, kernel_id: str) -> None:
        """Drop what this transport keeps for kernel *kernel_id* (its link, its start options,
        a checked websocket no link took); the kernel itself is left alone."""
        opened = self.opened.pop(kernel_id, None)
        if opened is not None and self._loop is not None:
            self._loop.loop.call_soon_threadsafe(opened[0].close)
        self.links.pop(kernel_id, None)
        self._options.pop(kernel_id, None)

    def interrupt_kernel(self, kernel_id: str) -> None:
        self.rest.interrupt(kernel_id)

    def restart_kernel(self, kernel_id: str) -> None:
        self.rest.restart(kernel_id)

    def start_note(self, kernel_id: str) -> str | None:
        """What happened before kernel *kernel_id* answered (for %colab_status); None if nothing."""
        arrivals = self.arrivals.get(kernel_id)
        return jupyter_start.note(arrivals) if arrivals else None

    def open_lane(self, kernel_id: str, proxy, session) -> jupyter_lane.Lane:
        """The in-process lane of a Session to kernel *kernel_id*, whose *proxy* serves it; the
        Session client's jupyter_client *session* gives the requests' session id."""
        loop = self.loop()
        link = self._link(kernel_id)
        return jupyter_lane.Lane(link, loop.loop, proxy.publish, session, later=loop.selector.later)

    def delivery(self, kernel_id: str) -> str | None:
        """How output is delivered to the kernel *kernel_id* across drops (for %colab_status)."""
        link = self.links.get(kernel_id)
        return link.delivery() if link is not None else None

    # -- pipes -----------------------------------------------------------------------------
    def _link(self, kernel_id: str) -> KernelLink:
        link = self.links.get(kernel_id)
        if link is None:
            try:
                self.rest.kernel_model(kernel_id)
            except FileNotFoundError:
                msg = f"no kernel {kernel_id!r} on {self.target}"
                raise PermanentLinkError(msg) from None
            link = self.new_link(kernel_id)
        return link

    def new_link(self, kernel_id: str, options: dict | None = None) -> KernelLink:
        """The link for kernel *kernel_id* (known to exist); *options* are its start options
        (``mock_gpu``, ``env``), remembered for the kernel."""
        if options is not None:
            self._options[kernel_id] = options
        opts = self._options.get(kernel_id, {})
        link = KernelLink(
            kernel_id,
            rest=self.rest,
            journal=self.journal,
            mock_gpu=opts.get("mock_gpu", False),
            env=opts.get("env"),
            ping_interval=self.ping_interval,
            stable_session=self.stable_session,
        )
        self.links[kernel_id] = link
        return link

    def loop(self) -> _Loop:
        """The event loop thread of this transport's websockets (started on first use)."""
        if self._loop is None:
            self._loop = _Loop()
        return self._loop

    async def _connect(self, kernel_id: str, session_id: str, timeout: float | None = None):
        from tornado import httpclient, websocket

        timeout = self.connect_timeout if timeout is None else timeout
        request = httpclient.HTTPRequest(
            self.rest.ws_url(kernel_id, session_id),
            headers={"Authorization": self.rest._token.header()},
            connect_timeout=min(self.connect_timeout, timeout),
            request_timeout=timeout,
        )
        protocols = [V1] if self.subprotocol == "auto" else None
        inbox = Inbox()
        try:
            ws = await websocket.websocket_connect(
                request,
                subprotocols=protocols,
                max_message_size=_MAX_MESSAGE,
                on_message_callback=inbox.put,
            )
        except httpclient.HTTPClientError as exc:
            if exc.code == 404:
                msg = f"no kernel {kernel_id!r} on {self.target}"
                raise PermanentLinkError(msg) from None
            if exc.code in (401, 403):
                msg = self.rest.refused(f"websocket to {self.target}", exc.code)
                raise PermanentLinkError(msg) from None
            if exc.code == 424:
                raise PermanentLinkError(self.rest.gone()) from None
            msg = f"websocket to {self.target} failed: HTTP {exc.code}"
            raise ConnectError(msg) from None
        except (OSError, asyncio.TimeoutError) as exc:
            msg = f"cannot open the kernel websocket on {self.target} ({type(exc).__name__})"
            raise ConnectError(msg) from None
        return ws, ws.selected_subprotocol, inbox

    def open_pipe(self, kernel_id: str) -> LinkPipe:
        """Open the kernel's websocket and return the proxy's end of a fresh link pipe."""
        link = self._link(kernel_id)
        session_id = link.next_session_id()
        opened = self.opened.pop(kernel_id, None)  # the start check's websocket: already open
        try:
            ws, subprotocol, inbox = opened or self.loop().run(
                self._connect(kernel_id, session_id), self.connect_timeout + 5
            )
        except TimeoutError:
            msg = f"the kernel websocket on {self.target} did not open in {self.connect_timeout:g}s"
            raise ConnectError(msg) from None
        pipe = LinkPipe(self, kernel_id)
        self.loop().spawn(link.serve(ws, subprotocol, pipe.inner, inbox))
        return pipe

    # -- files -----------------------------------------------------------------------------
    def upload(self, local: str, remote: str | None, *, cwd: str | None = None) -> int:
        """Copy a local file or tree to the server (contents API, chunked, resumable)."""
        from colabmagic.transport.jupyter_files import upload

        return upload(self.rest, local, remote)

    def download(self, remote: str, local: str | None, *, cwd: str | None = None) -> int:
        """Copy a file or tree from the server (``/files`` with ranges, resumable)."""
        from colabmagic.transport.jupyter_files import download

        return download(self.rest, remote, local)

    async def _end_links(self) -> None:
        for ws, _, _ in self.opened.values():  # checked at start, never handed to a link
            with contextlib.suppress(Exception):
                ws.close()
        self.opened.clear()
        for link in self.links.values():
            if link.current is not None:
                link._end(link.current, "the transport was closed")
        for _ in range(3):
            await asyncio.sleep(0)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.run(self._end_links(), 5)
            self._loop.stop()
            self._loop = None
        self.links.clear()
