"""``python -m pipeline COMMAND ...`` is ``fnet-distill COMMAND ...`` (so ``torchrun -m pipeline`` works)."""

from pipeline.cli import main

main()
