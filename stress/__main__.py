"""``python -m stress bench [...]`` / ``python -m stress chaos [...]``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m stress {bench,chaos} [options]

  bench   benchmark mppools against named baselines (see `python -m stress bench -h`)
  chaos   fault-injection run (stress/chaos.py)
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "bench":
        from stress import bench

        return bench.main(rest)
    if command == "chaos":
        import importlib

        try:
            chaos = importlib.import_module("stress.chaos")
        except ModuleNotFoundError as exc:
            if exc.name not in {"stress.chaos", "stress"}:
                raise  # chaos exists but one of its own imports is missing
            print(
                "python -m stress chaos: stress/chaos.py is not available in this checkout "
                "(it is added separately); nothing was run",
                file=sys.stderr,
            )
            return 2
        return int(chaos.main(rest))
    print(f"python -m stress: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
