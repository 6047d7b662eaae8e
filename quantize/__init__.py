"""The SOP quantizer: weights in, golden layer streams out.

From Python (docs/quantizer.md, section 7): ``schemes.get_quant_format(name).quantize(w, act_ms)``
for one matrix (the registry of every ``--format`` name, behind the input checks of ``inputs``);
``models.open_model``, ``calib.calibrate``, ``evaluate.evaluate`` and ``artifact.quantize_model`` /
``open_artifact`` for a whole model, as the commands call them; ``in_memory.quantize_module`` for a
``torch.nn.Module`` a script holds (in place, calibrated on its batches).

How a checkpoint becomes a ``.sopq`` (`sop quantize`), module by module:

1. ``models.open_model``: the checkpoint's linear layers (``tensor_readers`` reads each file format,
   ``checkpoint_files`` refuses a damaged one, ``fp8_scales`` scales an FP8 layer);
2. ``layer_loop.calibration_for`` -> ``calib.calibrate``: each layer's mean square input per column,
   from the model run by ``e2e`` (BERT) or ``causal_lm`` (causal LMs);
3. ``layer_loop``: each layer read (``read_weight``: ``inputs.sanitize``) and quantized by its format
   (``schemes.get_quant_format(f).quantize``): a SOP point by ``sop_search.quantize_point`` (the table
   pairs, ``dd4``, ``sparse``), which encodes blocks with ``blockwise`` into a golden layer stream;
   ``sop-budget`` first chooses each layer's option with ``knapsack``; ``--jobs`` runs the layers on
   ``jobs``' workers;
4. ``artifact``: each layer's record (``encode_record``: the packed golden stream,
   ``golden.layout.pack_layer``) written into the ``.sopq``, atomically, with its header.

`sop eval` (``evaluate``) runs steps 1 to 3 and measures each format (``metrics``, end to end with
``e2e`` / ``causal_lm``); ``hf_export`` writes a ``.sopq``'s reconstructions back into a model folder.
"""

from sop import imported_as_subpackage

imported_as_subpackage(__name__)
