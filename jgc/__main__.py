import sys

from jgc._src.cli import main

sys.exit(main())
