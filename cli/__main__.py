"""`python -m cli ...` runs the same `ragindex` command line as the console script."""

from cli.main import main

main()
