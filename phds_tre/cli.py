"""The ``phds`` command line.

One click group; each concern registers its own sub-command here. Errors that
a user can fix are printed as one line (``phds: error: ...``) with exit status
2, never as a traceback.
"""

from __future__ import annotations

import click

from phds_tre import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phds")
def cli() -> None:
    """phds_tre: federated paediatric analyses with statistical disclosure control."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="phds")


if __name__ == "__main__":  # pragma: no cover
    main()
