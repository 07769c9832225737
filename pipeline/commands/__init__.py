"""The ``fnet-distill`` commands, one module each; ``pipeline.cli`` assembles them into one Typer app."""
