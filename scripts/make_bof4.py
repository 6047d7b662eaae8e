#!/usr/bin/env python3
"""Regenerate golden/data/bof4.json (the BOF4 and BOF4-S constants) with golden/bof4.py.

Run: .venv/bin/python scripts/make_bof4.py  (deterministic: fixed seed, about 3 s).
"""

import json
from pathlib import Path

from sop.golden import bof4
from sop.golden.files import write_atomic

OUT = Path(__file__).resolve().parent.parent / "golden" / "data" / "bof4.json"

if __name__ == "__main__":
    doc = {"procedure": "sop.golden.bof4.generate", "parameters": bof4.DEFAULTS,
           "codebooks": bof4.generate()}
    write_atomic(OUT, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"wrote {OUT}")
