"""The synthesis flow: ``yosys_nextpnr`` (runs, counts, Fmax, reports), ``cli`` (`make synth`,
``python -m sop.synth``) and ``bitstream`` (`make bitstream`, board bitstreams)."""
