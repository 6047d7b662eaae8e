"""The golden model: the bit-exact numpy specification of every format, codebook, layout and the decoder (docs/formats.md)."""
