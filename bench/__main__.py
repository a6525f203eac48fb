"""``python -m bench kernel ...``: dispatch to one benchmark."""

import sys

from . import kernel

SUITES = {"kernel": kernel.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
        sys.exit(f"usage: python -m bench {{{'|'.join(SUITES)}}} [--quick] [--device cpu|cuda] [--out FILE]")
    SUITES[sys.argv[1]](sys.argv[2:])
