"""`make bitstream`: a board's bitstream with the yowasp tools, nothing programmed.

    python -m sop.synth.flow.bitstream icebreaker|ulx3s|icebreaker-gemv [--residuals R] [--out DIR]

``build(board, residuals=)`` synthesizes, places and routes the board top
(synth/gateware/board.py, ``BoardTop``; ``residuals``: the decoder's residual
adders, default the board's 1, 0 for the decoder without the sparse-residual
path) through the board's Amaranth platform
(amaranth-boards) with the yowasp tools (sop.toolenv), into
``build/bitstream/<board>/`` under the working directory. The decoder's
register copies are kept apart (hdl.replica's ``YOSYS_KEEP``); the ULX3S maps
its LUTs with classic ABC (``ECP5_CLASSIC_LUT_MAP``, shared with
synth/flow/yosys_nextpnr.py). The ULX3S top holds the GEMV engine beside the
decoder (synth/gateware/board.py, ``Board.gemv``); the iCEBreaker has two
cores, ``icebreaker`` (the decoder) and ``icebreaker-gemv`` (the GEMV engine
without the decoder, which takes no ``--residuals``). ``--residuals`` takes 0 to
hdl.config's ``MAX_RESIDUALS``, what the decoder builds (whether a board's device
holds it is the tools' verdict). A board's files are named after ``Board.top_name``
(``sop_icebreaker_gemv``: '-' as '_').
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sop import toolenv
from sop.argtypes import ToolParser, number, out_folder
from sop.golden.files import OutputError, check_output
from sop.hdl.config import MAX_RESIDUALS
from sop.synth.gateware.board import BOARDS, BoardTop

from .yosys_nextpnr import ECP5_CLASSIC_LUT_MAP

#: Yosys honours a memory's ``no_rw_check`` attribute (hdl.lut_bank, the folded engine's x buffer:
#: a read and a write never meet at one address) when it reads Verilog, not from Amaranth's RTLIL,
#: where each read port says "old data on a collision" (``COLLISION_X_MASK`` 0) and synthesis builds
#: that behaviour around every block RAM: a register of the word and the write address, a mux per
#: bit (278 flip-flops and 131 LUT4 on the folded engine's x buffer). After ``proc``, the memories
#: are collected and those marked get "a collision reads X", the attribute's contract. Each marked
#: memory has one read port and one write port (a one-bit mask).
YOSYS_NO_RW_CHECK = ("memory_collect", "setparam -set RD_COLLISION_X_MASK 1'1 a:no_rw_check t:$mem_v2 %i")


def build(board: str, build_dir: str | os.PathLike | None = None, residuals: int | None = None):
    """Synthesize, place and route the board top with the yowasp tools; no programming."""
    from sop.hdl.replica import YOSYS_KEEP

    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r}; boards: {', '.join(BOARDS)}")
    env = toolenv.apply()
    env.setdefault("OPENFPGALOADER", "true")          # the ULX3S plan names it even without programming
    build_dir = Path(build_dir) if build_dir else toolenv.build_root() / "bitstream" / board
    top = BoardTop(board, residuals)            # a core without a decoder refuses residuals here, before the tools
    platform = BOARDS[board].platform()
    name = BOARDS[board].top_name
    overrides = {"script_after_read": "\n".join(YOSYS_KEEP + YOSYS_NO_RW_CHECK)}
    if BOARDS[board].kit == "ulx3s":
        # Yosys 0.70's ABC9 LUT mapping for ECP5 fails an internal assertion on this design
        # (ABC_OPS_REINTEGRATE, rtlil.cc:3091): synth_ecp5 runs up to its LUT mapping, classic
        # ABC maps the LUTs, and synth_ecp5 finishes from its cell mapping (as the ``ecp5``
        # target's fallback in yosys_nextpnr.py does).
        overrides["synth_opts"] = "-run begin:map_luts"
        overrides["script_after_synth"] = "\n".join(ECP5_CLASSIC_LUT_MAP + (
            f"synth_ecp5 -top {name} -run map_cells:",))
    return platform.build(top, name=name, build_dir=str(build_dir), do_program=False, **overrides)


def _no_board() -> str:
    """The usage error of a board not named: ``make bitstream BOARD=`` (empty) ran the tool without one, and
    argparse's "the following arguments are required: board" named neither the variable nor the boards."""
    return (f"no board named (make bitstream's BOARD= is empty, or no BOARD argument): give one of "
            f"{', '.join(BOARDS)}, as make bitstream BOARD={next(iter(BOARDS))}")


def _board(text: str) -> str:
    """argparse's type of BOARD: an empty or blank name (``BOARD=`` quoted by the Makefile) is ``_no_board``."""
    if not text.strip():
        raise argparse.ArgumentTypeError(_no_board())
    return text


def main(argv=None) -> int:
    """``python -m sop.synth.flow.bitstream BOARD [--residuals R] [--out DIR]``: one board's bitstream
    (BOARD: a name of synth/gateware/board.py's ``BOARDS``)."""
    p = ToolParser(prog="python -m sop.synth.flow.bitstream", usage="%(prog)s BOARD [--residuals R] [--out DIR]",
                                description="one board's bitstream: the yowasp tools' synthesis, place and "
                                            "route (no programming)")
    p.add_argument("board", nargs="?", type=_board, choices=list(BOARDS), metavar="BOARD",
                   help=f"the board: {', '.join(BOARDS)}")
    p.add_argument("--residuals", type=number(int, 0, inclusive=True, maximum=MAX_RESIDUALS), default=None,
                   help=f"the decoder's residual adders, 0 to {MAX_RESIDUALS} (default the board's; 0: no "
                        f"sparse-residual path)")
    p.add_argument("--out", type=out_folder, default=None, metavar="DIR",
                   help="the build folder (default build/bitstream/BOARD under the working folder)")
    args = p.parse_args(argv)
    if args.board is None:
        p.error(f"argument BOARD: {_no_board()}")
    if args.residuals is not None and not BOARDS[args.board].decoder:
        p.error(f"board {args.board} has no decoder: --residuals does not apply")
    out = args.out or toolenv.build_root() / "bitstream" / args.board
    try:
        check_output(out, folder=True)
    except OutputError as err:
        p.error(str(err))
    family = ("NEXTPNR_ECP5", "ECPPACK") if BOARDS[args.board].kit == "ulx3s" else ("NEXTPNR_ICE40", "ICEPACK")
    env = toolenv.apply(dict(os.environ))       # the tools Amaranth will call: a user's YOSYS=... included
    try:
        toolenv.require([env[v] for v in ("YOSYS",) + family], "make bitstream")
    except toolenv.ToolMissing as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    build(args.board, out, args.residuals)
    print(f"bitstream in {out}/")
    return 0


if __name__ == "__main__":
    from sop.terminal import run_command

    run_command("python -m sop.synth.flow.bitstream", main)
