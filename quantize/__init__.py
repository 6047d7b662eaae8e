"""The SOP quantizer: weights in, golden layer streams out.

From Python (docs/quantizer.md, section 7): ``schemes.get_quant_format(name).quantize(w, act_ms)``
for one matrix (the registry of every ``--format`` name, behind the input checks of ``inputs``);
``models.open_model``, ``calib.calibrate``, ``evaluate.evaluate`` and ``artifact.quantize_model`` /
``open_artifact`` for a whole model, as the commands call them; ``in_memory.quantize_module`` for a
``torch.nn.Module`` a script holds (in place, calibrated on its batches).
"""

if not __name__.startswith("sop."):      # the checkout's folder imported as a package of its own
    raise ImportError(f"import sop.{__name__}, not {__name__}: the checkout's {__name__}/ is the sop "
                      f"package's, and imported apart its classes are not those sop.{__name__} returns")
