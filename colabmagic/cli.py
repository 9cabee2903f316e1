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

# -- remote host commands: kernels, serve (SSH) --------------------------------------------------
