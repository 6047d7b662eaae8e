"""`python -m sop.synth` (`make synth`): the synthesis flow's command line, synth/flow/cli.py."""

import sys

from sop.synth.flow.cli import main

if __name__ == "__main__":
    sys.exit(main())
