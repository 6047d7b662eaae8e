"""Board host software (plain Python): ``client`` (the protocol client: ``BoardLink``,
``SerialTransport``), ``bringup`` (`sop board`, ``python -m sop.synth.host.bringup --sim``) and
``gemv_bringup`` (`sop board --gemv`, ``python -m sop.synth.host.gemv_bringup --sim``)."""
