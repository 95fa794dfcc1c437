"""``python -m tuner``: the command line."""

import sys

from tuner.cli import main

sys.exit(main())
