"""`python -m vmbox.faults [--small] [--only NAME]`: inject every fault, print the table."""

import sys

from vmbox.faults.runner import main

sys.exit(main())
