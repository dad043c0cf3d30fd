"""`python -m vmbox`: the same as the `vmbox` command (runtimes start replicas this way)."""

from vmbox.cli import main

main()
