"""`colabmagic exp ...` commands."""

import click


@click.group(name="exp")
def exp() -> None:
    """Batch experiments: queue, run, daemon, sync."""
