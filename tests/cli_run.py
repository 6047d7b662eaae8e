"""The `sop` command line in-process, for the tests: ``run(argv)`` is its exit status."""

from sop.cli import main


def run(argv) -> int:
    """main's exit status for ``argv`` (paths allowed: each argument is made a string); argparse's
    usage errors exit through SystemExit, as argparse does, and give its status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code or 0)
