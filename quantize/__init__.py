"""The SOP quantizer: weights in, golden layer streams out.

From Python (docs/quantizer.md, section 7): ``schemes.get_quant_format(name).quantize(w, act_ms)``
for one matrix (the registry of every ``--format`` name, behind the input checks of ``inputs``);
``models.open_model``, ``calib.calibrate``, ``evaluate.evaluate`` and ``artifact.quantize_model`` /
``open_artifact`` for a whole model, as the commands call them; ``in_memory.quantize_module`` for a
``torch.nn.Module`` a script holds (in place, calibrated on its batches).
"""

from sop import imported_as_subpackage

imported_as_subpackage(__name__)
