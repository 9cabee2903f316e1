"""`colabmagic fp ...` commands."""

import click


@click.group(name="fp")
def fp() -> None:
    """Audio fingerprinting: index, query, de-duplicate."""
