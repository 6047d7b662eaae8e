"""Board gateware (Amaranth): ``uart``, ``protocol`` (the engine), ``board`` (cores and tops),
``gemv_port`` (the GEMV engine behind the protocol), ``wrapper`` (the synthesis timing wrapper)
and ``simboard`` (the board in amaranth.sim as a host transport). Imports the protocol's numbers
from sop.synth.wire, never the host client."""
