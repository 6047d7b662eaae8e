"""Open-source synthesis, the board gateware and the board host, in three parts that live apart.

* ``sop.synth.wire``: the board protocol's numbers, frames and CRC (plain
  Python), the one definition both ends of the serial line import;
* ``sop.synth.gateware``: Amaranth designs: the UART, the protocol engine, the
  GEMV engine's port behind it (``gemv_port``), the board tops, the synthesis
  timing wrapper, and the board in amaranth.sim as a host transport
  (``simboard``). It never imports ``sop.synth.host`` (tests/test_synth_layout.py);
* ``sop.synth.host``: host software: the protocol client (``client``:
  ``BoardLink``, ``SerialTransport``), the bring-up behind `sop board` and
  ``python -m sop.synth.host.bringup --sim`` (``bringup``), and the GEMV
  bring-up behind `sop board --gemv` (``gemv_bringup``);
* ``sop.synth.flow``: the synthesis flow: yosys and nextpnr runs and their
  report (``yosys_nextpnr``; its command line ``cli``: ``python -m sop.synth``,
  `make synth`) and the board bitstreams (``bitstream``,
  ``python -m sop.synth.flow.bitstream``, `make bitstream`).
"""

from sop import imported_as_subpackage

imported_as_subpackage(__name__)
