# SOP: quantizer, golden model and LUT-decoder generator.  `make help` lists the targets.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# Warnings are errors in the suite (pyproject's filterwarnings); -p no:cacheprovider keeps pytest's cache out
# of the tree (Hypothesis keeps its example database under build/: tests/conftest.py).
PYTEST := $(PY) -m pytest -p no:cacheprovider
# make test and test-fast run the files in parallel (pytest-xdist, a file per worker: a module's
# fixtures are built once), one worker per core up to 4 (each may hold a model in memory);
# TEST_JOBS=0 runs them in this process, one after another.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n > 4 ? 4 : n )))
# (=, not :=: expanded by test and test-fast alone, so an empty TEST_JOBS= stops those two in one line, where
# pytest said "argument -n/--numprocesses: expected one argument", and no other target)
NO_JOBS := TEST_JOBS= is empty: give the number of test workers, TEST_JOBS=N (0: none, the tests in make's process)
JOBS_GIVEN = $(if $(strip $(TEST_JOBS)),,$(error $(NO_JOBS)))
PARALLEL = $(JOBS_GIVEN)$(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

.PHONY: help setup test test-fast fuzz demo verilog sim synth bitstream bench peers mutate clean

SIM ?= icarus
BOARD ?= icebreaker

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## idempotent: Icarus (apt), .venv, project editable with dev extras

$(STAMP): pyproject.toml scripts/setup.sh
	scripts/setup.sh

test: $(STAMP)  ## the whole suite but the checks `make mutate` runs (set-up first if needed; TEST_JOBS=N workers, 0: none)
	$(PYTEST) -q $(PARALLEL) -m "not long" --durations=20

test-fast: $(STAMP)  ## the suite without the slow tests
	$(PYTEST) -q $(PARALLEL) -m "not slow and not long"

fuzz: $(STAMP)  ## the fuzz suite, long (SOP_FUZZ=1: 50x the examples of make test, not derandomized)
	SOP_FUZZ=1 $(PYTEST) -q -m fuzz

demo: $(STAMP)  ## all-MiniLM-L6-v2: every format's errors, a golden decode, the RTL in cocotb, the dot engine
	$(VENV)/bin/sop demo

.PHONY: demo-llm
demo-llm: $(STAMP)  ## SmolLM2-135M-Instruct: baselines and SOP points with calibration, ppl/KLD table, .sopq, a model folder transformers loads, a GGUF llama.cpp runs, greedy completions
	$(PY) -m sop.demo_llm

verilog: $(STAMP)  ## Verilog + JSON manifest of each named decoder configuration in build/verilog/, those with BF16 output of up to 8 lanes also with residuals (NAME-sp), their AXI4-Stream shells with FuseSoC cores (NAME_axis.v, NAME_axis.core), and the GEMV engines (gemv-*.v) with their AXI4-Stream shells and FuseSoC cores (gemv-*_axis.v, gemv-*_axis.core)
	$(PY) -m sop.hdl.generate --out build/verilog

sim: $(STAMP)  ## cocotb regression of every named configuration, and of each operating point's own configuration with the LUT RAM tables make synth builds on ECP5 (SIM=icarus|verilator, WAVES=1), of every AXI4-Stream shell (cocotbext-axi), of the GEMV engines (and the small-FPGA one) and their AXI4-Stream shells, then the board bring-ups in simulation (the decoder; the GEMV engine of the ULX3S core and of the iCEBreaker's GEMV core)
	$(PY) -m sop.sim.runner --sim "$(SIM)"
	$(PY) -m sop.sim.runner --sim "$(SIM)" --lutram-ecp5
	$(PY) -m sop.sim.runner --sim "$(SIM)" --axis
	$(PY) -m sop.sim.gemv_runner --sim "$(SIM)"
	$(PY) -m sop.sim.gemv_runner --sim "$(SIM)" --config gemv-sop4-g16-small
	$(PY) -m sop.sim.tb_gemv_axis --sim "$(SIM)"
	$(PY) -m sop.synth.host.bringup --sim
	$(PY) -m sop.synth.host.gemv_bringup --sim
	$(PY) -m sop.synth.host.gemv_bringup --sim --board icebreaker-gemv

synth: $(STAMP)  ## yosys + nextpnr of every named configuration (iCE40UP5K, ECP5-85F): build/synth/report.json; then the GEMV engine beside the naive path in the same flow, and the folded engine (1 MAC a cycle): build/dot_vs_naive/report.json
	$(PY) -m sop.synth
	$(PY) bench/dot_vs_naive.py --design sop-engine --design sop-units --design naive-tree --design sop-engine-folded

bitstream: $(STAMP)  ## FPGA bitstream for BOARD=icebreaker|ulx3s|icebreaker-gemv (the iCEBreaker's GEMV-only core) in build/bitstream/$(BOARD)/ (no programming)
	$(PY) -m sop.synth.flow.bitstream "$(BOARD)"

bench: $(STAMP)  ## the figures in docs/: HIF width, codebooks, SOP4 header, quantizer speed, the searches' variants, sim speed, lane sweep (after make synth), Fmax over placement seeds, peak memory per weight, the golden decoder's BF16 output
	$(PY) bench/hif_sqnr.py
	$(PY) bench/codebook_sqnr.py
	$(PY) bench/header_sqnr.py
	$(PY) bench/quantize_speed.py
	$(PY) bench/search_ablation.py
	$(PY) bench/sim_speed.py
	$(PY) bench/lane_sweep.py
	$(PY) bench/fmax_seeds.py
	$(PY) bench/memory.py
	$(PY) bench/decode_bf16.py

peers: $(STAMP)  ## install the quantizers bench/peer_speed.py times ours against (pinned, CPU): bitsandbytes, torchao, fouroversix
	$(VENV)/bin/pip install -q "bitsandbytes==0.50.2" packaging
	$(VENV)/bin/pip install -q --no-deps "torchao==0.18.0"
	SKIP_CUDA_BUILD=1 $(VENV)/bin/pip install -q --no-deps --no-build-isolation "fouroversix==1.0.5"

mutate: $(STAMP)  ## mutation score of both operating points, of the residual path and of the GEMV engine, E4M3, BF16 and the folded small-FPGA one (about 85 min on 2 cores, about 18 of them the BF16 engine and 8 the folded one: docs/gemv-mutation.md): yosys mutate, 1,000 mutants for each decoder (300 of sop4-g16-sp's residual path) and 200 for each GEMV engine, against the fast regression (Verilator), survivors proven equivalent or listed: build/mutate/summary.md
	$(PYTEST) -q -m long
	$(PY) -m sop.sim.mutate --mutants 1000 --seed 1 --out build/mutate
	$(PY) -m sop.sim.gemv_mutate --mutants 200 --seed 1 --out build/mutate-gemv
	$(PY) -m sop.sim.gemv_mutate --config gemv-sop4-g16-bf16 --mutants 200 --seed 1 --out build/mutate-gemv-bf16
	$(PY) -m sop.sim.gemv_mutate --config gemv-sop4-g16-small --mutants 200 --seed 1 --out build/mutate-gemv-small

clean:  ## remove generated files (build/, the calibration and YoWASP caches in it too), keep the venv
	rm -rf build .pytest_cache .hypothesis

.PHONY: wheel
wheel: $(STAMP)  ## the wheel in build/dist/ (setuptools' staging folders build/lib and build/bdist.* emptied first)
	rm -rf build/lib build/bdist.*
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/dist .
