"""`python -m slmfast ...` runs the command line in slmfast/cli.py."""

import sys

from slmfast.cli import main

sys.exit(main())
