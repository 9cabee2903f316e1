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


# -- remote host commands: kernels, serve (SSH) --------------------------------------------------
