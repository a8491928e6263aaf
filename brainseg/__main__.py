"""``python -m brainseg``: the CLI, usable from the project folder without installing the package."""

from brainseg.cli import main

main()
