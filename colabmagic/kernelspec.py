"""Install, list and remove kernelspecs that run a whole notebook on a remote GPU kernel.

A colabmagic kernelspec is an ordinary Jupyter kernelspec (so ``jupyter kernelspec list`` shows
it) whose ``metadata.kernel_provisioner`` hands the launch to
:class:`~colabmagic.provisioner.ColabProvisioner`::

    from colabmagic import kernelspec
    kernelspec.install("colab", target="colab")   # "colab (remote GPU)" in JupyterLab
    kernelspec.list_kernelspecs()                  # [{'name': 'colab', 'target': 'colab', ...}]
    kernelspec.remove("colab")

The command line is ``colabmagic kernelspec install|list|remove``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from typing import Any

from colabmagic.errors import ColabMagicError, ParameterError

PROVISIONER_NAME = "colabmagic-provisioner"  # the entry point of provisioner.ColabProvisioner
_NAME_RE = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOGOS = ("logo-32x32.png", "logo-64x64.png")


def _manager(kernel_spec_manager=None):
    if kernel_spec_manager is not None:
        return kernel_spec_manager
    from jupyter_client.kernelspec import KernelSpecManager

    return KernelSpecManager()


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["K=V", ...]`` (as typed after ``--env``) to a dict; a malformed item is an error."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME_RE.match(key):
            msg = f"--env {item!r} must look like NAME=VALUE (NAME: letters, digits, '_')"
            raise ParameterError(msg)
        env[key] = value
    return env


def kernel_json(
    name: str,
    *,
    target: str | None = None,
    local: bool = False,
    display_name: str | None = None,
    python: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    mock_gpu: bool = False,
    transport_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``kernel.json`` of a colabmagic kernelspec (validated; see :func:`install`)."""
    if not _NAME_RE.match(name or ""):
        msg = (
            f"kernelspec name {name!r} must use only letters, digits, '.', '_' and '-' "
            "(e.g. colab-gpu)"
        )
        raise ParameterError(msg)
    if target == "local":
        target, local = None, True
    if local and target:
        msg = f"--local and --target {target!r} exclude each other; give one of them"
        raise ParameterError(msg)
    if not local and not target:
        msg = "give --target HOST (an ssh host or ~/.ssh/config alias) or --local"
        raise ParameterError(msg)
    from colabmagic.transport.jupyter import is_server_url, parse_server_url

    if is_server_url(target):
        target = parse_server_url(target)  # no token in the URL, https off loopback
    elif target and (target.startswith("-") or any(c.isspace() for c in target)):
        msg = f"target {target!r} is not an ssh host or alias (no spaces, no leading '-')"
        raise ParameterError(msg)
    for key in env or {}:
        if not _ENV_NAME_RE.match(key):
            msg = f"environment variable name {key!r} must use letters, digits and '_'"
            raise ParameterError(msg)
    config: dict[str, Any] = {"local": True} if local else {"target": target}
    if python:
        config["python"] = python
    if cwd:
        config["cwd"] = cwd
    if env:
        config["env"] = dict(env)
    if mock_gpu:
        config["mock_gpu"] = True
    if transport_options:
        config["transport_options"] = dict(transport_options)
    where = "local" if local else target
    return {
        # Only jupyter_client < 7 (no provisioners) would run argv; it explains and exits.
        "argv": [sys.executable, "-m", "colabmagic.kernelspec", "{connection_file}"],
        "display_name": display_name or (f"{name} (local)" if local else f"{name} (remote GPU)"),
        "language": "python",
        "interrupt_mode": "message",
        "env": {},
        "metadata": {
            "debugger": True,
            "colabmagic": {"target": where},
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
        },
    }


def install(
    name: str,
    *,
    target: str | None = None,
    local: bool = False,
    display_name: str | None = None,
    python: str | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    mock_gpu: bool = False,
    transport_options: dict[str, Any] | None = None,
    user: bool = False,
    sys_prefix: bool = False,
    prefix: str | None = None,
    kernel_spec_manager=None,
) -> str:
    """Install (or replace) the kernelspec *name*; return the directory it was written to.

    Parameters
    ----------
    name
        Kernelspec name (letters, digits, ``.``, ``_``, ``-``), e.g. ``colab``.
    target
        ssh host or ``~/.ssh/config`` alias of the GPU host; exclusive with *local*.
    local
        Run the agent and kernel on this machine (the ``--local`` path, for trying it out).
    display_name
        Name in JupyterLab's launcher and kernel menu (default ``"NAME (remote GPU)"``).
    python, cwd, env
        Interpreter, working directory and extra environment of the kernel on the target.
    mock_gpu
        Install the NumPy-backed ``cupy`` mock in the kernel.
    transport_options
        Extra keyword arguments for the transport (e.g. SSH options), stored in kernel.json.
    user, sys_prefix, prefix
        Where to install: the per-user Jupyter data directory (the default), this Python
        environment, or ``PREFIX/share/jupyter/kernels``; give at most one.

    Returns
    -------
    str
        The installed kernelspec directory.

    Examples
    --------
    >>> install("colab", target="colab")  # doctest: +SKIP
    '/home/me/.local/share/jupyter/kernels/colab'
    """
    if sum([bool(user), bool(sys_prefix), prefix is not None]) > 1:
        msg = "give at most one of --user, --sys-prefix and --prefix"
        raise ParameterError(msg)
    spec = kernel_json(
        name,
        target=target,
        local=local,
        display_name=display_name,
        python=python,
        cwd=cwd,
        env=env,
        mock_gpu=mock_gpu,
        transport_options=transport_options,
    )
    if sys_prefix:
        prefix = sys.prefix
    ksm = _manager(kernel_spec_manager)
    with tempfile.TemporaryDirectory(prefix="colabmagic-kernelspec-") as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        logos = resources.files("colabmagic") / "resources"
        for logo in LOGOS:
            with open(os.path.join(tmp, logo), "wb") as f:
                f.write((logos / logo).read_bytes())
        try:
            return ksm.install_kernel_spec(
                tmp, kernel_name=name, user=prefix is None, prefix=prefix
            )
        except OSError as exc:
            msg = f"could not install kernelspec {name!r}: {exc.strerror or exc}"
            raise ColabMagicError(msg) from None


def _is_ours(entry: dict) -> bool:
    """Whether a ``get_all_specs()`` entry is a colabmagic kernelspec."""
    spec = entry.get("spec") or {}
    prov = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
    return prov.get("provisioner_name") == PROVISIONER_NAME


def list_kernelspecs(kernel_spec_manager=None) -> list[dict[str, Any]]:
    """The installed colabmagic kernelspecs: name, display name, target, options, directory."""
    out = []
    specs = _manager(kernel_spec_manager).get_all_specs()
    for name, entry in sorted(specs.items()):
        if not _is_ours(entry):
            continue
        spec = entry["spec"]
        config = spec["metadata"]["kernel_provisioner"].get("config") or {}
        out.append(
            {
                "name": name,
                "display_name": spec.get("display_name", name),
                "target": "local" if config.get("local") else config.get("target"),
                "python": config.get("python"),
                "cwd": config.get("cwd"),
                "mock_gpu": bool(config.get("mock_gpu")),
                "resource_dir": entry.get("resource_dir"),
            }
        )
    return out


def remove(name: str, kernel_spec_manager=None) -> str:
    """Remove the colabmagic kernelspec *name*; return the directory removed.

    Kernelspecs of other kernels are refused (use ``jupyter kernelspec remove`` for those).
    """
    ksm = _manager(kernel_spec_manager)
    specs = ksm.get_all_specs()
    if name not in specs:
        ours = ", ".join(k for k, v in sorted(specs.items()) if _is_ours(v))
        msg = f"no kernelspec named {name!r}; colabmagic kernelspecs: {ours or 'none'}"
        raise ParameterError(msg)
    if not _is_ours(specs[name]):
        msg = (
            f"kernelspec {name!r} is not a colabmagic kernelspec; "
            f"remove it with: jupyter kernelspec remove {name}"
        )
        raise ParameterError(msg)
    path = specs[name]["resource_dir"]
    try:
        shutil.rmtree(path)
    except OSError as exc:
        msg = f"could not remove kernelspec {name!r} at {path}: {exc.strerror or exc}"
        raise ColabMagicError(msg) from None
    return path


if __name__ == "__main__":
    sys.exit(
        "colabmagic kernelspecs are started by the colabmagic-provisioner kernel provisioner; "
        "this application runs argv directly, which needs jupyter_client >= 7 to work"
    )
