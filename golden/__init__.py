"""The golden model: the bit-exact numpy specification of every format, codebook, layout, operating point,
the decoder and the dot-product engine (docs/formats.md, docs/dot.md), and the atomic file writes they use."""

from sop import imported_as_subpackage

imported_as_subpackage(__name__)
