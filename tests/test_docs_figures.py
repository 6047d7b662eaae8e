"""Figures quoted in README and docs/ are what the code measures now.

The README's headline (`make demo`: E2M3 + UE4M4 g16 against FP8 with a per-layer
power-of-two scale, aggregate SQNR on all-MiniLM-L6-v2, calibrated) is measured
again here, as `sop eval` measures it, and compared with the text to the digit
it is quoted to.
"""

import re
from pathlib import Path

from sop.quantize.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent


def quoted_headline() -> tuple[float, float, int]:
    text = ROOT.joinpath("README.md").read_text()
    m = re.search(r"all-MiniLM-L6-v2 weights: (\d+\.(\d+)) dB against (\d+\.\d+) dB aggregate SQNR, "
                  r"on every layer", text)
    assert m, "README no longer quotes the demo's headline in the expected words"
    return float(m[1]), float(m[3]), len(m[2])


def test_the_readme_headline_is_the_measured_one(tmp_path):
    fp6_quoted, fp8_quoted, digits = quoted_headline()
    doc = evaluate("minilm", ["e2m3-ue4m4-g16", "fp8-e4m3-pot"], e2e=False, progress=False,
                   cache_dir=tmp_path)
    fp6, fp8 = doc["formats"]["e2m3-ue4m4-g16"], doc["formats"]["fp8-e4m3-pot"]
    assert (round(fp6["sqnr_db"], digits), round(fp8["sqnr_db"], digits)) == (fp6_quoted, fp8_quoted)
    assert all(fp6["layers"][n]["sqnr_db"] > fp8["layers"][n]["sqnr_db"] for n in fp6["layers"])   # "every layer"
