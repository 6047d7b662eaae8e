"""What the synthesis flow (synth/flow/yosys_nextpnr.py) reads from yosys's and nextpnr's reports and
writes into report.md and docs/synthesis.md, on hand-made reports (no tools run): cell counts with their
weights, the critical path's figures, the late endpoints' order and boundary, Fmax, utilisation, the
design's cells apart from the wrapper's, the seed nextpnr is given, and the table's columns. An outside
mutation run found each of these computations unchecked by the tests that run the tools."""

import json

from sop.synth.flow import yosys_nextpnr as flow


def test_ecp5_luts_count_a_carry_cell_as_two():
    assert flow.count_cells({"LUT4": 10, "CCU2C": 3, "TRELLIS_FF": 5}, flow.TARGETS["ecp5"].counts["luts"]) == 16
    assert flow.count_cells({"LUT4": 10, "CCU2C": 3, "TRELLIS_FF": 5}, flow.TARGETS["ecp5"].counts["ffs"]) == 5


def test_nextpnr_is_given_the_seed_and_the_frequency(monkeypatch, tmp_path):
    argvs = []
    monkeypatch.setattr(flow, "_run", lambda argv, *a, **k: argvs.append(argv))
    flow.place_and_route(tmp_path, flow.TARGETS["ecp5"], 187.5, seed=3)
    (argv,) = argvs
    assert argv[argv.index("--seed") + 1] == "3" and argv[argv.index("--freq") + 1] == "187.5"


def _seg(kind, a, b, delay, net=None):
    seg = {"type": kind, "from": {"cell": a}, "to": {"cell": b}, "delay": delay}
    return seg if net is None else {**seg, "net": net}


def test_the_critical_path_figures():
    """The first register-to-register path (an async one before it is passed over): from its first
    cell to its last, its total, logic and routing delays, its logic cells and its longest net."""
    report = {"critical_paths": [
        {"from": "<async>", "to": "posedge clk", "path": [_seg("routing", "pin", "x", 9.0, "pin_net")]},
        {"from": "posedge clk", "to": "posedge clk", "path": [
            _seg("clk-to-q", "a", "a", 0.5), _seg("routing", "a", "b", 1.0, "n1"), _seg("logic", "b", "b", 0.7),
            _seg("routing", "b", "c", 2.0, "n2"), _seg("setup", "c", "c", 0.3)]}]}
    assert flow.critical_path(report) == {
        "start": "a", "end": "c", "delay_ns": 4.5, "logic_ns": 0.7, "routing_ns": 3.0, "cells": 1,
        "longest_net": {"net": "n2", "ns": 2.0}}
    report["critical_paths"][0]["to"] = "<async>"      # async at either end is passed over
    report["critical_paths"][0]["from"] = "posedge clk"
    assert flow.critical_path(report)["delay_ns"] == 4.5
    del report["critical_paths"][1]["path"][-1]         # a path that ends on its last route: its end is c
    assert flow.critical_path(report)["end"] == "c"


def _net(name, *ends):
    return {"net": name, "endpoints": [{"cell": c, "delay": [0.5, t]} for c, t in ends]}


def test_late_endpoints_are_worst_first_not_most_first_and_on_time_at_the_limit():
    """At 200 MHz the limit is 96 % of 5 ns = 4.8 ns: an endpoint arriving at exactly 4.8 ns is on time;
    a group of one endpoint at 6.0 ns comes before a group of three at 5.0 ns."""
    report = {"detailed_net_timings": [
        _net("many", ("a_0", 5.0), ("a_1", 5.0), ("a_2", 5.0)), _net("one", ("b", 6.0)), _net("edge", ("c", 4.8))]}
    got = flow.late_endpoints(report, 200.0)
    assert [(g["register"], g["count"], g["worst_ns"]) for g in got] == [("b", 1, 6.0), ("a_#", 3, 5.0)]


def test_read_pnr_rounds_fmax_to_two_decimals_and_keeps_the_used_resources(tmp_path):
    (tmp_path / "pnr.json").write_text(json.dumps({
        "fmax": {"clk": {"achieved": 186.734, "constraint": 200.0}},
        "utilization": {"A": {"used": 0, "available": 9}, "B": {"used": 2, "available": 9}}}))
    got = flow.read_pnr(tmp_path)
    assert got["fmax_mhz"] == 186.73 and got["utilisation"] == {"B": {"used": 2, "available": 9}}


def test_the_designs_total_cells_leave_out_the_wrappers_instance_of_it(tmp_path):
    """yosys's stat of a wrapped design (the shape it writes): the wrapper holds 3 flip-flops and one
    instance of the design (a cell of the design's own module type), the design one flip-flop."""
    (tmp_path / "stat.json").write_text(json.dumps({"modules": {
        "\\top": {"num_cells_by_type": {"SB_DFF": 3, "top.dut": 1}},
        "\\top.dut": {"num_cells_by_type": {"SB_DFFSR": 1, "$scopeinfo": 2}}}}))
    got = flow.read_cells(tmp_path, "top", flow.TARGETS["ice40"])
    assert got == {"design": {"SB_DFFSR": 1}, "total": {"SB_DFFSR": 1, "SB_DFF": 3}}


def test_the_tables_columns_and_the_met_or_missed_constraint():
    rec = {"luts": 111, "ffs": 22, "brams": 3, "dsps": 0, "lutram": 4, "constraint_mhz": 50, "wall_s": 7}
    table = flow.markdown_table({"cfg": {"ice40": {**rec, "fmax_mhz": 45.0}, "ecp5": {**rec, "fmax_mhz": 60.0}}})
    assert "| cfg | ice40 | 111 | 22 | 3 | 0 | 4 | 45.0 | 50 (missed) |" in table
    assert "| cfg | ecp5 | 111 | 22 | 3 | 0 | 4 | 60.0 | 50 (met) |" in table
    assert "| cfg | ecp5 | 111 | 22 | 3 | 0 | 4 | 50.0 | 50 (met) |" in flow.markdown_table(
        {"cfg": {"ecp5": {**rec, "fmax_mhz": 50.0}}})
