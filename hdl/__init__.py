"""Amaranth RTL of the LUT decoder (implements golden.decoder)."""
