"""From what the user typed (a target, ``--local``, options) to a registered Session.

The magics and :func:`colabmagic.connect` both come here, so the Python API and ``%colab_connect``
behave identically.
"""

from __future__ import annotations

from typing import Any

from colabmagic import linkstate, routes
from colabmagic.errors import ParameterError
from colabmagic.session import Session, registry

_LOCAL_TARGETS = (None, "", "local")  # targets that mean "this machine"


def make_transport(target: str | None, *, local: bool = False, **options: Any):
    """The transport for *target*: local for ``--local``/``"local"``, a Jupyter server for
    ``https://...``, else SSH (a ``colab://`` line pins the host keys and picks the tunnel
    client)."""
    if local or target in _LOCAL_TARGETS:
        if target not in _LOCAL_TARGETS:
            msg = f"--local and a target ({target!r}) exclude each other; give one of them"
            raise ParameterError(msg)
        from colabmagic.transport.local import LocalTransport

        return LocalTransport(root=options.pop("root", None), python=options.pop("python", None))
    from colabmagic.transport.jupyter import is_server_url

    if is_server_url(target):
        from colabmagic.transport.jupyter import JupyterTransport

        if options.pop("python", None):
            msg = "--python does not apply to a Jupyter server; it runs its kernelspec's Python"
            raise ParameterError(msg)
        return JupyterTransport(target, **options)
    server_only = [
        k for k in ("token_env", "kernel_name", "start_timeout") if options.get(k) is not None
    ]
    if server_only:
        flag = "--" + server_only[0].replace("_", "-")
        msg = f"{flag} applies to Jupyter-server (https://) targets only"
        raise ParameterError(msg)
    options = {
        k: v for k, v in options.items() if k not in ("token_env", "kernel_name", "start_timeout")
    }
    from colabmagic.transport.ssh import SSHTransport

    if routes.is_line(target):  # a pasted colab:// line: its route and pinned host keys
        route = routes.parse(target)
        return SSHTransport(route.target, **{**options, **route.transport_options()})
    return SSHTransport(target, **options)


def connect(
    target: str | None = None,
    *,
    local: bool = False,
    name: str | None = None,
    mock_gpu: bool = False,
    attach: str | None = None,
    restart: bool = False,
    cwd: str | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
    idle_timeout: float | None = None,
    connect_timeout: float = 60.0,
    reconnect_timeout: float = 300.0,
    register: bool = True,
    save: str | None = None,
    **transport_options: Any,
) -> Session:
    """Connect (or restart/attach) and return the session; see :func:`colabmagic.connect`."""
    name = name or "default"
    if not name.replace("-", "").replace("_", "").isalnum():
        msg = f"session name {name!r} must use letters, digits, '-' and '_' only"
        raise ParameterError(msg)
    if restart:
        session = registry.get(name)
        if _agent_died(session):
            return _start_again(session, connect_timeout, reconnect_timeout, register)
        session.restart(timeout=connect_timeout)
        return session
    if target is None and not local:
        msg = "give a target (an ssh host or alias) or --local, e.g. %colab_connect --local"
        raise ParameterError(msg)
    if python is not None:
        transport_options["python"] = python
    if not local and target not in _LOCAL_TARGETS:
        transport_options.setdefault("connect_timeout", connect_timeout)
    if save and not routes.is_line(target):
        msg = f"--save {save} needs a colab:// line to save (got {target!r})"
        raise ParameterError(msg)
    transport = make_transport(target, local=local, **transport_options)
    if save:  # the pin is verified on this first connection; Session.start reuses it
        try:
            routes.save_verified(routes.parse(target), save, transport)
        except BaseException:
            transport.close()
            raise
    session = Session.start(
        transport,
        name=name,
        mock_gpu=mock_gpu,
        attach=attach,
        cwd=cwd,
        env=env,
        idle_timeout=idle_timeout,
        reconnect_timeout=reconnect_timeout,
        connect_timeout=connect_timeout,
    )
    linkstate.watch(session.proxy)  # lets %colab_status tell "host unreachable" from "link down"
    if register:
        registry.add(session)
    return session


def _agent_died(session: Session) -> bool:
    """True when the session's agent itself is gone (not just its kernel): restart needs a new
    agent, not the old agent's restart operation."""
    reason = session.proxy.dead_reason or ""
    return session.proxy.state == "dead" and session.proxy.kernel_exit is None and "died" in reason


def _start_again(old: Session, timeout: float, reconnect_timeout: float, register: bool) -> Session:
    """A new agent and kernel on the same host, under the same session name."""
    old.close()
    session = Session.start(
        old.transport,
        name=old.name,
        mock_gpu=old.mock_gpu,
        cwd=old.remote_info.get("cwd"),
        connect_timeout=timeout,
        reconnect_timeout=reconnect_timeout,
    )
    if register:
        registry.add(session)
    return session
