"""Settings for the project's fuzz suite (hypothesis property tests over every file the CLI reads).

Each fuzz test is marked ``@pytest.mark.fuzz`` and decorated with ``fuzz(n)``:
``n`` examples in ``make test`` (the bounded run: every fuzz test together stays
under 60 s on two cores), ``FUZZ_FACTOR * n`` under ``make fuzz``
(``SOP_FUZZ=1``), where the examples also stop being derandomized, so that each
long run explores new inputs. The property every fuzz test checks: the outcome
is a clean error (the documented exception, whose message names the input) or
an unchanged, correct result; never another exception, a hang or a silently
different result.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("SOP_FUZZ") == "1"
FUZZ_FACTOR = int(os.environ.get("SOP_FUZZ_FACTOR", "50"))


def fuzz(examples: int):
    """Hypothesis settings for a fuzz test: ``examples`` in the bounded run, more under ``make fuzz``."""
    return settings(max_examples=examples * FUZZ_FACTOR if LONG else examples, deadline=None,
                    derandomize=not LONG, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])
