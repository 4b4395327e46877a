"""The ``cogalign`` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="CogAlign pipeline: ingest -> annotate -> masks -> counterfactuals -> SFT -> RL -> evaluate.",
                  no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the package version."""
    from cogalign_core import __version__

    typer.echo(__version__)
