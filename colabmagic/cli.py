"""The ``colabmagic`` command.

A :func:`click.group`; each sub-command parses its options and calls one library function.
Library errors (:class:`~colabmagic.errors.ColabMagicError`) become one-line click errors.
"""

from __future__ import annotations

import functools
import json

import click

from colabmagic.errors import ColabMagicError


def user_errors(fn):
    """Turn library errors into one-line ``click`` errors (exit status 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ColabMagicError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


class _LazyGroup(click.Group):
    """A group whose big sub-command groups are imported only when they run (or are listed).

    ``colabmagic fp ...`` must not pay for importing the experiment machinery (jsonschema alone
    costs seconds on a busy machine), nor ``exp`` for NumPy/SciPy.
    """

    lazy = {
        "fp": "colabmagic.fingerprint.cli:fp",
        "exp": "colabmagic.experiments.cli:exp",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            import importlib

            module, attr = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="colabmagic")
def main() -> None:
    """colabmagic: run notebook cells on a remote GPU kernel as if they ran locally."""


# -- demo and kernelspec commands (foundation, JupyterLab) ---------------------------------------


@main.command()
@click.option("--notebook", type=click.Path(exists=True, dir_okay=False), help="another notebook")
@click.option("--output", type=click.Path(dir_okay=False), help="save the executed notebook")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="seconds per cell")
def demo(notebook: str | None, output: str | None, timeout: float) -> None:
    """Run the quick-start notebook on the embedded default (a local kernel) and print it."""
    from nbclient.exceptions import CellExecutionError

    from colabmagic.demo import render, run_notebook

    try:
        nb = run_notebook(notebook, timeout=timeout, output=output)
    except CellExecutionError as exc:
        msg = f"the demo notebook failed: {exc}"
        raise click.ClickException(msg) from None
    for line in render(nb):
        click.echo(line)
    click.echo("demo finished: every cell ran through the colabmagic link.")


@main.group()
def kernelspec() -> None:
    """JupyterLab kernelspecs that run the whole notebook on a remote GPU kernel."""


@kernelspec.command("install")
@click.argument("name")
@click.option("--target", help="ssh host or alias of the GPU host, or https://jupyter-server/.")
@click.option("--token-env", metavar="VAR", help="Jupyter-server target: the token's variable.")
@click.option(
    "--start-timeout", type=float, help="Jupyter-server target: seconds a new kernel has to answer."
)
@click.option("--local", is_flag=True, help="Run the kernel on this machine instead.")
@click.option("--display-name", help='Name in the kernel picker (default "NAME (remote GPU)").')
@click.option("--python", help="Python interpreter of the kernel on the target.")
@click.option("--cwd", help="Working directory of the kernel on the target.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Kernel environment (repeat).")
@click.option("--mock-gpu", is_flag=True, help="Install the NumPy-backed cupy mock.")
@click.option("--user", is_flag=True, help="Install for this user (the default).")
@click.option("--sys-prefix", is_flag=True, help="Install into this Python environment.")
@click.option("--prefix", type=click.Path(file_okay=False), help="Install under PREFIX.")
@user_errors
def kernelspec_install(name, env, token_env, start_timeout, **options) -> None:
    """Install kernelspec NAME, e.g. `colabmagic kernelspec install colab --target colab`."""
    from colabmagic import kernelspec as ks
    from colabmagic.transport.jupyter import is_server_url
    from colabmagic.transport.jupyter_start import validate_timeout

    transport = {}
    if token_env:  # the variable's name is stored, never the token
        transport["token_env"] = token_env
    if start_timeout is not None:
        if not is_server_url(options.get("target")):
            msg = "--start-timeout applies to Jupyter-server (https://) targets only"
            raise click.UsageError(msg)
        transport["start_timeout"] = validate_timeout(start_timeout)
    if transport:
        options["transport_options"] = transport
    path = ks.install(name, env=ks.parse_env(env), **options)
    click.echo(f"Installed kernelspec {name} in {path}")


@kernelspec.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@user_errors
def kernelspec_list(as_json: bool) -> None:
    """List the installed colabmagic kernelspecs."""
    from colabmagic.kernelspec import list_kernelspecs

    specs = list_kernelspecs()
    if as_json:
        echo_json(specs)
        return
    for s in specs:
        click.echo(f"{s['name']:<20} {s['target']:<20} {s['display_name']:<30} {s['resource_dir']}")


@kernelspec.command("remove")
@click.argument("name")
@user_errors
def kernelspec_remove(name: str) -> None:
    """Remove the colabmagic kernelspec NAME."""
    from colabmagic.kernelspec import remove

    click.echo(f"Removed {remove(name)}")


# -- remote host commands: kernels, serve (SSH) --------------------------------------------------


def _ssh_options(fn):
    """The ssh options shared by the remote host commands."""
    for opt in reversed(
        [
            click.option("-p", "--port", type=int, help="ssh port"),
            click.option("-i", "--identity", help="ssh private key file"),
            click.option("--proxy", "proxy_command", metavar="CMD", help="ssh ProxyCommand"),
            click.option("-F", "--ssh-config", metavar="FILE", help="ssh config (~/.ssh/config)"),
            click.option("--python", help="remote interpreter (default python3)"),
            click.option("--root", help="remote directory of the agents"),
            click.option("--accept-new-host-key", is_flag=True, help="record an unknown host key"),
            click.option("--connect-timeout", type=float, default=30.0, show_default=True),
        ]
    ):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--token-env", metavar="VAR", help="Jupyter server: the token's variable")
@_ssh_options
@user_errors
def kernels(target: str, as_json: bool, **ssh: object) -> None:
    """List the kernels running on TARGET (an ssh alias, [user@]host[:port], https://jupyter
    server/, or 'local').

    They outlive disconnects: attach with %colab_connect TARGET --attach ID.
    """
    from colabmagic.connection import make_transport
    from colabmagic.transport.jupyter import is_server_url

    if target == "local":
        transport = make_transport(None, local=True, root=ssh.get("root"))
    elif is_server_url(target):
        keep = ("token_env", "connect_timeout")
        transport = make_transport(target, **{k: ssh[k] for k in keep if ssh.get(k) is not None})
    else:
        transport = make_transport(target, **{k: v for k, v in ssh.items() if v is not None})
    try:
        rows = transport.list_kernels()
    finally:
        transport.close()
    if as_json:
        echo_json(rows)
        return
    cols = ["id", "state", "kernel_pid", "attached", "started", "cwd"]
    table = [cols] + [[str(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.option("--public-key", help="your public key (text or .pub file); required to start")
@click.option("--port", type=int, default=2222, show_default=True, help="port of the sshd")
@click.option(
    "--tunnel", type=click.Choice(["none", "cloudflared", "tailscale", "ngrok"]), default="none"
)
@click.option("--listen", help="address sshd binds (default: 127.0.0.1 with a tunnel)")
@click.option("--host", help="name the local side uses for this machine")
@click.option("--alias", default="colab", show_default=True, help="Host alias to print")
@click.option("--no-install", is_flag=True, help="do not apt-get install openssh-server")
@click.option("--stop", "stop_", is_flag=True, help="stop the sshd/tunnel started before")
@user_errors
def serve(public_key, port, tunnel, listen, host, alias, no_install, stop_) -> None:
    """GPU host side: start sshd (+ tunnel) and print the one %colab_connect line to paste."""
    from colabmagic import colab

    if stop_:
        click.echo(f"stopped: {colab.stop() or 'nothing was running'}")
        return
    if not public_key:
        msg = "give --public-key (the contents or path of your ~/.ssh/id_ed25519.pub)"
        raise click.UsageError(msg)
    info = colab.serve(
        public_key,
        port=port,
        tunnel=tunnel,
        listen=listen,
        host=host,
        alias=alias,
        install=not no_install,
    )
    click.echo(str(info))
