"""``python -m slmforge`` runs the CLI."""

from slmforge.cli.main import main

main()
