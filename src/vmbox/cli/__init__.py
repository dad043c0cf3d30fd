"""The `vmbox` command (`vmbox.cli:main`, the console script).

main.py holds the command group and the service commands; status.py
(`vmbox status`, `vmbox scale`), experiment.py (`vmbox experiment`) and
lab.py (`vmbox lab`) the commands with more to them; errors.py how every command fails in one line,
options.py the options they share.
"""

from vmbox.cli.main import main

__all__ = ["main"]
