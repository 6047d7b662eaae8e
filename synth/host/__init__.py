"""Board host software (plain Python): ``client`` (the protocol client: ``BoardLink``,
``SerialTransport``) and ``bringup`` (`sop board`, ``python -m sop.synth.host.bringup --sim``)."""
