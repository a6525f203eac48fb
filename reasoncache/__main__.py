"""``python -m reasoncache ...``: the command line (see ``reasoncache --help``)."""

import sys

from .app.cli import main

sys.exit(main())
