"""``python -m bench {kernel|decode|generate|train|quality|audit|smoke} ...`` (installed:
``reasoncache bench ...``); ``--help`` after a suite lists its options."""

import importlib
import sys

# Every suite is a module of this package with ``main(argv)``; each is imported only when it
# runs, so naming the suites costs no torch import.
SUITES = ("kernel", "decode", "generate", "train", "quality", "audit", "smoke")


def main(argv: list[str], prog: str = "python -m bench") -> int:
    """Run suite ``argv[0]`` with the rest of ``argv``; ``prog`` is the command the user typed, for
    usage lines. Returns the exit status."""
    if not argv or argv[0] not in SUITES:
        got = f" (got {argv[0]!r})" if argv else ""
        print(f"usage: {prog} {{{'|'.join(SUITES)}}} [--help] ...{got}", file=sys.stderr)
        return 2
    suite = importlib.import_module(f"{__package__}.{argv[0]}")
    rc = suite.main(argv[1:], prog=f"{prog} {argv[0]}")  # the audit returns an exit status; the others their rows
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
