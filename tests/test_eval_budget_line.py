"""`sop eval --format sop-budget` and `sop quantize` say on standard output what the knapsack chose: one line
counting the layers that took each option (quantize/evaluate.py ``budget_choices_line``), checked against the
choices `sop quantize` records in the .sopq header for the same model and budget."""

import json
import re
from collections import Counter

import numpy as np
import torch
from safetensors.torch import save_file

from sop.cli import main
from sop.quantize.artifact import open_artifact
from sop.quantize.evaluate import budget_choices_line


def test_eval_prints_how_many_layers_took_each_budget_option(tmp_path, capsys):
    rng = np.random.default_rng(3)
    # heavy tails of several weights: layers the knapsack promotes differently
    sd = {f"l.{i}.fc.weight": torch.from_numpy((rng.standard_t(2 + i, (16, 64)) * 0.05).astype(np.float32))
          for i in range(5)}
    model = tmp_path / "m.safetensors"
    save_file(sd, model)
    assert main(["eval", str(model), "--format", "sop-budget", "--budget", "6", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget ")]
    assert len(lines) == 1, lines
    head, _, rest = lines[0].partition(": ")
    assert head == "budget 6 bpw (sop-budget)"
    said = {}
    for i, part in enumerate(rest.split(", ")):
        m = re.fullmatch(r"(\d+) (?:layers? )?(\S+)", part)
        assert m and (" layer" in part) == (i == 0), part
        said[m.group(2)] = int(m.group(1))
    counts = list(said.values())
    assert counts == sorted(counts, reverse=True) and sum(counts) == 5
    assert main(["quantize", str(model), "--format", "sop-budget", "--budget", "6", "--quiet",
                 "--out", str(tmp_path / "q.sopq")]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget ")] == lines
    recorded = Counter(e.choice.split(": ")[0] for e in open_artifact(tmp_path / "q.sopq").layers)
    assert said == dict(recorded) and len(said) > 1, said        # more than one option: the count is seen
    doc = json.loads((tmp_path / "e.json").read_text())
    assert "budget" in doc["formats"]["sop-budget"]


def test_the_budget_line_counts_the_most_taken_option_first_and_one_layer_is_singular():
    line = budget_choices_line("sop-budget", 5.0, ["b: x", "a: y", "c: z", "a: w", "c: v", "c: u"])
    assert line == "budget 5 bpw (sop-budget): 3 layers c, 2 a, 1 b"
    assert budget_choices_line("sop-budget", 4.75, ["sop4-g16+sp1%: nf4+dd4"]) == \
        "budget 4.75 bpw (sop-budget): 1 layer sop4-g16+sp1%"
