"""The ``mppools`` command: inspect, repair and demonstrate host-wide budgets.

::

    mppools status [NAME] [--json] [--watch [SECONDS]] [--prometheus]
    mppools reclaim NAME [--json]
    mppools unlink NAME [--force]
    mppools check NAME [--limit N] [--broker URL] [--management URL] [--threads N] [--json]
    mppools demo [--workers 8] [--limit 3] [--seconds 20] [--broker URL] [--kill-every 3]

User mistakes (an unknown name, a foreign or incompatible segment, no permission, a refused
unlink, a bad argument) print one line on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mppools._errors import BudgetInUseError, MppoolsError
from mppools.cli._common import EXIT_INTERRUPTED, EXIT_USAGE, CLIError
from mppools.cli._prometheus import render_prometheus

__all__ = ["build_parser", "main", "render_prometheus"]

PROG = "mppools"

_STATUS_EXAMPLES = """\
examples:
  mppools status                      one line per budget on this host
  mppools status web                  limit, in use, free, waiting, and every holder pid
  mppools status web --json           the same, machine-readable
  mppools status web --watch          refresh every 2 s, like top (Ctrl-C quits)
  mppools status web --watch 0.5 -n 10
  mppools status --prometheus         text exposition for every budget (node_exporter
                                      textfile collector, or a scrape endpoint)

Reading a budget takes no slot: status is safe to run against production.
"""

_RECLAIM_EXAMPLES = """\
examples:
  mppools reclaim web                 give back the slots of processes that died
  mppools reclaim web --json

Waiters reclaim dead holders' slots by themselves; this is for budgets nobody waits on.
"""

_UNLINK_EXAMPLES = """\
examples:
  mppools unlink web                  refused while live processes hold or wait for slots
  mppools unlink web --force          remove it anyway (also a foreign or corrupt segment)

After an unlink, processes still attached keep using the old (now nameless) budget while new
ones create a new budget: stop the users first.
"""

_CHECK_EXAMPLES = """\
examples:
  mppools check web                   the budget, /dev/shm, fd limits, namespaces, squatters
  mppools check web --broker redis://cache:6379/0
                                      also: the limit against redis maxclients, and
                                      connections to redis not made through the budget
  mppools check web --broker amqp://user:pw@mq:5672/prod
                                      the vhost's max-connections through the management
                                      api (http://mq:15672 unless --management URL)
  mppools check web --limit 20 --threads 8    a budget not created yet
  mppools check web --json            for scripts; exits 1 if a check failed

Read-only: no slot is taken, nothing is written, a missing budget is not created.
"""

_DEMO_EXAMPLES = """\
examples:
  mppools demo                        8 workers share 3 slots for 20 s, no server needed
  mppools demo --seconds 10 --workers 4 --limit 2 --kill-every 2
  mppools demo --kill-every 0         no kills
  mppools demo --broker redis://localhost:6379/0   also shows redis' own client count

Each worker is a forked process publishing through mppools.producers as fast as it can;
every --kill-every seconds a random worker that holds a slot is SIGKILLed and replaced.
Exits 1 if the slots in use ever exceeded the limit.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``mppools`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, repair and demonstrate mppools budgets: one host-wide budget "
        "of broker connections shared by every forked worker.",
        epilog="run `mppools COMMAND --help` for the examples of each command",
        formatter_class=_Formatter,
    )
    from mppools import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    status = sub.add_parser(
        "status", help="show one budget, or every budget on this host",
        description="Show a budget's limit, slots in use, free, waiting and debt, and one "
        "row per holder pid (command line, slots, idle/busy, held for how long; dead holders "
        "flagged). Without NAME, one summary line per budget on this host, anyone's: one "
        "that cannot be read is flagged (another user's, foreign, another layout version, "
        "damaged) and never stops the listing. Exits 1 if the named budget's tables are "
        "damaged (shown, with the repair command), 2 if it cannot be read at all.",
        epilog=_STATUS_EXAMPLES, formatter_class=_Formatter,
    )
    status.add_argument("name", nargs="?", metavar="NAME", help="budget name (default: all)")
    fmt = status.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable JSON (with "
                     "--watch: one JSON document per line)")
    fmt.add_argument("--prometheus", action="store_true",
                     help="Prometheus text exposition format")
    status.add_argument("--watch", nargs="?", const=2.0, type=_positive_float,
                        metavar="SECONDS", help="refresh every SECONDS (default 2) until "
                        "Ctrl-C")
    status.add_argument("-n", "--iterations", type=_positive_int, metavar="N",
                        help="with --watch: stop after N refreshes")

    reclaim = sub.add_parser(
        "reclaim", help="reclaim the slots of dead processes now",
        description="Run an audit of the budget: clear the slot and waiter records of dead "
        "processes and make the free count exact, then print what was reclaimed.",
        epilog=_RECLAIM_EXAMPLES, formatter_class=_Formatter,
    )
    reclaim.add_argument("name", metavar="NAME", help="budget name")
    reclaim.add_argument("--json", action="store_true", help="machine-readable JSON")

    unlink = sub.add_parser(
        "unlink", help="remove a budget's shared objects",
        description="Remove /dev/shm/mppools.NAME and its semaphore. Refused while live "
        "processes hold or wait for its slots (the reason names them), unless --force.",
        epilog=_UNLINK_EXAMPLES, formatter_class=_Formatter,
    )
    unlink.add_argument("name", metavar="NAME", help="budget name")
    unlink.add_argument("--force", action="store_true",
                        help="remove even while in use, or when the segment is not mppools'")

    check = sub.add_parser(
        "check", help="preflight: is this host set up safely for a budget, does it fit",
        description="Check one budget on this host: that it is readable and undamaged, that "
        "no other user holds its names in /dev/shm, /dev/shm free space, the open-file "
        "limit against what one process may need, processes using it from another PID or "
        "network namespace and, with --broker, its limit against the broker's own cap and "
        "the connections to that broker not made through it. Each check prints ok, warn "
        "or fail with its numbers. Exits 1 if a check failed (with --strict, also on a "
        "warning), 2 on a usage error.",
        epilog=_CHECK_EXAMPLES, formatter_class=_Formatter,
    )
    check.add_argument("name", metavar="NAME", help="budget name")
    check.add_argument("--limit", type=_positive_int, metavar="N",
                       help="the limit planned for a budget that does not exist yet")
    check.add_argument("--broker", metavar="URL",
                       help="broker to check against: redis://, rediss://, amqp://, amqps://")
    check.add_argument("--management", metavar="URL",
                       help="RabbitMQ management api (default http://BROKER-HOST:15672, "
                       "with the broker url's user)")
    check.add_argument("--threads", type=_positive_int, metavar="N",
                       help="threads or greenlets one process runs against the pool at once "
                       "(default: as many as the limit)")
    check.add_argument("--timeout", type=_positive_float, default=5.0, metavar="S",
                       help="seconds to wait for the broker (default 5)")
    check.add_argument("--strict", action="store_true", help="exit 1 on a warning too")
    check.add_argument("--json", action="store_true", help="machine-readable JSON")

    demo = sub.add_parser(
        "demo", help="watch forked workers share a small budget while some get SIGKILLed",
        description="Fork N publisher workers that share a budget of --limit connections, "
        "kill random slot holders, and check that the limit always held. Uses kombu's "
        "filesystem:// transport in a temp dir unless --broker is given.",
        epilog=_DEMO_EXAMPLES, formatter_class=_Formatter,
    )
    demo.add_argument("--workers", type=_positive_int, default=8, metavar="N",
                      help="forked publisher processes (default 8)")
    demo.add_argument("--limit", type=_positive_int, default=3, metavar="L",
                      help="slots in the budget (default 3)")
    demo.add_argument("--seconds", type=_positive_float, default=20.0, metavar="S",
                      help="how long to run (default 20)")
    demo.add_argument("--broker", metavar="URL",
                      help="broker URL (default: filesystem:// in a temp dir)")
    demo.add_argument("--kill-every", type=_non_negative_float, default=3.0, metavar="S",
                      help="SIGKILL a random slot holder every S seconds (default 3, 0: never)")
    demo.add_argument("--name", metavar="NAME", help="budget name (default demo-<pid>)")
    demo.add_argument("--acquire-timeout", type=_positive_float, default=5.0, metavar="S",
                      help="workers' producers.acquire() timeout (default 5)")
    demo.add_argument("--seed", type=int, help="random seed for choosing whom to kill")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "status":
        from mppools.cli._status import run_status

        if args.iterations is not None and args.watch is None:
            raise CLIError("-n/--iterations needs --watch")
        return run_status(args.name, as_json=args.json, prometheus=args.prometheus,
                          watch=args.watch, iterations=args.iterations)
    if args.command == "reclaim":
        from mppools.cli._status import run_reclaim

        return run_reclaim(args.name, as_json=args.json)
    if args.command == "unlink":
        from mppools.cli._status import run_unlink

        return run_unlink(args.name, force=args.force)
    if args.command == "check":
        from mppools.cli._check import CheckOptions, run_check

        return run_check(CheckOptions(
            name=args.name, limit=args.limit, broker=args.broker, management=args.management,
            threads=args.threads, timeout=args.timeout, strict=args.strict,
        ), as_json=args.json)
    from mppools.cli._demo import DemoOptions, run_demo

    return run_demo(DemoOptions(
        workers=args.workers, limit=args.limit, seconds=args.seconds, broker=args.broker,
        kill_every=args.kill_every, name=args.name, acquire_timeout=args.acquire_timeout,
        seed=args.seed,
    ))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mppools`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the demo saw the limit exceeded or a check
        failed, 2 for a user mistake (one line on stderr), 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command = f"{PROG} {args.command}"
    try:
        return _dispatch(args)
    except CLIError as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.code
    except MppoolsError as exc:
        hint = ""
        if args.command == "unlink" and isinstance(exc, BudgetInUseError):
            hint = " (stop them first, or use --force)"
        print(f"{command}: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:
        print(f"{command}: error: permission denied: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader went away (`mppools status | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
