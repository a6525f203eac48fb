"""``python -m bench {kernel|decode|generate|train|quality|audit|smoke} ...``; ``--help`` after a suite
lists its options."""

import sys

from . import audit, decode, generate, kernel, quality, smoke, train

SUITES = {
    "kernel": kernel.main,
    "decode": decode.main,
    "generate": generate.main,
    "train": train.main,
    "quality": quality.main,
    "audit": audit.main,
    "smoke": smoke.main,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUITES:
        print(
            f"usage: python -m bench {{{'|'.join(SUITES)}}} [--quick] [--device cpu|cuda] [--out FILE]", file=sys.stderr
        )
        return 2
    rc = SUITES[argv[0]](argv[1:])  # the audit returns an exit status; the others their rows
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
