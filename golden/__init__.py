"""The golden model: the bit-exact numpy specification of every format, codebook, layout and the decoder (docs/formats.md)."""

if not __name__.startswith("sop."):      # the checkout's folder imported as a package of its own
    raise ImportError(f"import sop.{__name__}, not {__name__}: the checkout's {__name__}/ is the sop "
                      f"package's, and imported apart its classes are not those sop.{__name__} returns")
