"""`python -m envcheck` is the `envcheck` command."""

from envcheck.cli import main

main()
