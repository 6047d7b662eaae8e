"""The golden model: the bit-exact numpy specification of every format, codebook, layout and the decoder (docs/formats.md)."""

from sop import imported_as_subpackage

imported_as_subpackage(__name__)
