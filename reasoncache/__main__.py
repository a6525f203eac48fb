"""``python -m reasoncache ...``: the command line (see ``reasoncache --help``)."""

import sys

from .cli import main

sys.exit(main())
