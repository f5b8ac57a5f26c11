"""``python -m bonetumor``: the command line (as ``torchrun -m bonetumor`` will need)."""

from bonetumor.cli import main

main()
