"""Test-suite set-up: the project's tool environment (see sop.toolenv)."""

from sop import toolenv

toolenv.apply()
