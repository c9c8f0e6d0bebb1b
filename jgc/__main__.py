"""``python -m jgc``: the command line (see ``jgc --help``)."""

import sys

from jgc._src.cli import main

sys.exit(main())
