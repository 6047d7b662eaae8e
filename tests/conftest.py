"""Test-suite set-up: the project's tool environment (see sop.toolenv), and Hypothesis's files (its
example database and its cache of constants) under ``build/hypothesis``: generated files stay out of
the tree."""

from hypothesis.configuration import set_hypothesis_home_dir

from sop import toolenv

toolenv.apply()
set_hypothesis_home_dir(str(toolenv.build_root() / "hypothesis"))
