"""The ``colabmagic`` command.

A :func:`click.group`; each sub-command parses its options and calls one library function.
Library errors (:class:`~colabmagic.errors.ColabMagicError`) become one-line click errors.
"""

from __future__ import annotations

import functools
import json

import click

from colabmagic.errors import ColabMagicError
from colabmagic.experiments.cli import exp
from colabmagic.fingerprint.cli import fp


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


@click.group()
@click.version_option(package_name="colabmagic")
def main() -> None:
    """colabmagic: run notebook cells on a remote GPU kernel as if they ran locally."""


main.add_command(fp)
main.add_command(exp)

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
@click.option("--target", help="ssh host or ~/.ssh/config alias of the GPU host.")
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
def kernelspec_install(name, env, **options) -> None:
    """Install kernelspec NAME, e.g. `colabmagic kernelspec install colab --target colab`."""
    from colabmagic import kernelspec as ks

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
