"""The ``colabmagic`` command.

A :func:`click.group`; each sub-command parses its options and calls one library function.
Library errors (:class:`~colabmagic.errors.ColabMagicError`) become one-line click errors.
"""

from __future__ import annotations

import click

from colabmagic.experiments.cli import exp
from colabmagic.fingerprint.cli import fp


@click.group()
@click.version_option(package_name="colabmagic")
def main() -> None:
    """colabmagic: run notebook cells on a remote GPU kernel as if they ran locally."""


main.add_command(fp)
main.add_command(exp)
