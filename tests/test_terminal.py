"""sop.terminal.one_line: a message as one line with nothing a terminal would act on, and names that
differ only in their whitespace still told apart (an outside probe: a tab, a run of spaces and a
no-break space each printed as one space)."""

import pytest

from sop.terminal import one_line


@pytest.mark.parametrize("text, shown", [
    ("line 1\n  line 2\r\nline 3", "line 1 line 2 line 3"),            # a library's message of several lines
    ("a\u2028b\x85c\x0bd\x0ce", "a b c d e"),                          # every line boundary Python knows
    ("\n  trailing and leading  \n", "trailing and leading"),
    ("fc\tx.weight", "fc\\x09x.weight"),                                # a tab seen, not folded into a space
    ("fc  x.weight", "fc  x.weight"),                                   # a run of spaces kept
    ("fc\u00a0x.weight", "fc\u00a0x.weight"),                           # a no-break space kept
    ("fc\x1b[2J\x07\x9b1m\u202ex", "fc\\x1b[2J\\x07\\x9b1m\\u202ex"),  # escapes, BEL, CSI, a bidi override
])
def test_one_line_folds_line_breaks_only_and_escapes_controls(text, shown):
    assert one_line(text) == shown


def test_names_that_differ_in_whitespace_print_apart():
    names = ["fc x.weight", "fc\tx.weight", "fc  x.weight", "fc\u00a0x.weight"]
    assert len({one_line(n) for n in names}) == len(names)
