"""The ``sop`` console script: the fork server of ``--jobs`` started first, then ``sop.cli.entry``.

A `sop eval` or `sop quantize` with ``--jobs`` 2 or more forks its workers from a server that
imports the quantizer (quantize/job_server.py): started here, before ``sop.cli`` imports numpy and
the quantizer itself, the two imports run side by side (about 0.2 s less before the first layer).
Everything else, the command line's checks included, is ``sop.cli``'s: ``--jobs`` is read here as a
guess (``job_server.jobs_asked``), and a wrong guess changes when the server starts, not a result.
"""

import signal
import sys

#: what `sop` says of a Ctrl-C before its command has started (here, or in sop.cli's imports)
INTERRUPTED_STARTING = "sop: interrupted (SIGINT) while starting; nothing was written"


def entry() -> None:
    try:
        try:
            from sop.quantize.job_server import start_for

            start_for(sys.argv[1:])
        except Exception:                       # noqa: BLE001 - an early start only saves time; the pool
            pass                                # starts the server itself (one line if it cannot)
        # inside the try: a Ctrl-C in the import machinery (before sop.cli's own try runs) was a traceback
        from sop.cli import entry as run
    except KeyboardInterrupt:                   # as sop.cli's own imports say it
        print(INTERRUPTED_STARTING, file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    run()
