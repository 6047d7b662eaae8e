"""`python -m sop.synth` (`make synth`): the synthesis flow's command line, synth/flow/cli.py."""

from sop.synth.flow.cli import main

if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.synth", main)
