"""Figures quoted in README and docs/ are what the code measures now.

The README's headline (`make demo`: E2M3 + UE4M4 g16 against FP8 with a per-layer
power-of-two scale, aggregate SQNR on all-MiniLM-L6-v2, calibrated) is measured
again here, as `sop eval` measures it, and compared with the text to the digit
it is quoted to; and the README's folder table names every module of golden/, quantize/, hdl/,
sim/ and every page of docs/, as hdl/__init__.py's index names every hdl module. Tables the docs
keep by hand are checked against what they copy: sop.md's pair counts, hardware.md's named
configurations, formats.md's codebook values. Every link between the pages, every repository
path and test they quote, and every name of the package they quote resolves; every `sop` command
line they show names options the command has, and its synopses name them all.
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


def folder_rows(text: str) -> dict[str, str]:
    """README's folder table: folder name -> its row."""
    return {m[1]: m[0] for m in re.finditer(r"^\| `(\w+)/` \|.*$", text, re.M)}


def missing_from_readme(text: str) -> list[str]:
    """Modules of the code folders, and pages of docs/, that README's folder table does not name."""
    rows = folder_rows(text)
    missing = []
    for folder in ("golden", "quantize", "hdl", "sim"):
        for path in sorted(ROOT.joinpath(folder).glob("*.py")):
            if not path.name.startswith("_") and f"`{path.name}`" not in rows.get(folder, ""):
                missing.append(f"{folder}/{path.name}")
    missing += [f"docs/{p.name}" for p in sorted(ROOT.joinpath("docs").glob("*.md"))
                if f"(docs/{p.name})" not in rows.get("docs", "")]
    return missing


def test_the_readme_folder_table_names_every_module_and_doc():
    text = ROOT.joinpath("README.md").read_text()
    assert missing_from_readme(text) == []
    # the check can fail: a module dropped from its row is reported
    assert missing_from_readme(text.replace("`dot.py`", "`d.py`")) == ["golden/dot.py"]


def hdl_modules_missing(index: str) -> list[str]:
    """The modules of hdl/ that ``index`` (hdl/__init__.py's docstring, the package's index) does not name
    (each as ``name`` in double backquotes)."""
    return [p.name for p in sorted(ROOT.joinpath("hdl").glob("*.py"))
            if p.stem != "__init__" and f"``{p.stem}``" not in index]


def test_the_hdl_package_index_names_every_module():
    import sop.hdl

    assert hdl_modules_missing(sop.hdl.__doc__) == []
    # the check can fail: a module dropped from the index is reported
    assert hdl_modules_missing(sop.hdl.__doc__.replace("``gemv``", "the engine")) == ["gemv.py"]


def test_sop_md_counts_the_pairs_the_search_scores():
    """docs/sop.md's pair counts are the search's (a table added to FIXED_4BIT changes them)."""
    from sop.golden.codebooks import FIXED_4BIT
    from sop.quantize.sop_search import default_pairs

    text = " ".join(ROOT.joinpath("docs", "sop.md").read_text().split())
    fixed, every = len(default_pairs(list(FIXED_4BIT))), len(default_pairs([*FIXED_4BIT, "dd4"]))
    assert f"Every fixed table of `FIXED_4BIT` ({', '.join(FIXED_4BIT)})" in text
    assert {int(n) for n in re.findall(r"all (\d+) fixed pairs", text)} == {fixed}
    assert {int(n) for n in re.findall(r"all (\d+) pairs", text)} == {every}
    assert {int(n) for n in re.findall(r"its (\d+) pairs are scored", text)} == {every - fixed}


def test_hardware_md_lists_every_named_configuration_as_built():
    """docs/hardware.md's table of named configurations: one row per configuration, its lanes, output,
    beat bits and latency those of the decoder the generator builds (a hand-kept table goes stale)."""
    from amaranth.hdl import Fragment

    from sop.hdl.config import named_configs
    from sop.hdl.decoder import Decoder

    text = ROOT.joinpath("docs", "hardware.md").read_text()
    rows = {m[1]: [c.strip() for c in m[2].split("|")]
            for m in re.finditer(r"^\| ([a-z0-9-]+) \| (\d+ \|.*)\|$", text, re.M)}
    configs = named_configs()
    assert sorted(rows) == sorted(configs)
    for name, cfg in configs.items():
        lanes, _, output, beat, latency = rows[name]
        assert (int(lanes), output) == (cfg.lanes, cfg.output), name
        assert beat.startswith(f"{cfg.beat_bits} + swap"), name
        dut = Decoder(cfg)
        Fragment.get(dut, None)                      # elaborated: no component is left unused
        assert int(latency.split()[0]) == dut.latency, name


def test_formats_md_codebook_table_is_every_searched_table_as_rounded():
    """docs/formats.md section 5's table of values: a column per pair-search table, in its order, each
    entry the rounded table's value to the 6 digits printed."""
    from sop.golden.codebooks import FIXED_4BIT, get_codebook

    text = ROOT.joinpath("docs", "formats.md").read_text()
    head = re.search(r"^\| code \| (.*) \|$", text, re.M)
    assert head and tuple(head[1].split(" | ")) == FIXED_4BIT
    rows = [line.strip("|").split("|") for line in text[head.end():].split("\n\n")[0].splitlines()[2:]]
    assert [int(r[0]) for r in rows] == list(range(16))
    for j, name in enumerate(FIXED_4BIT):
        assert [r[j + 1].strip() for r in rows] == [f"{v:g}" for v in get_codebook(name).values], name


# -- links between the pages ---------------------------------------------------------------------------------

def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page: each heading's slug (lower case, punctuation but '-' dropped,
    spaces to '-', '-1', '-2', ... after a repeat) and every explicit ``<a id="...">``."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    found, seen = set(re.findall(r'<a id="([^"]+)"', text)), {}
    for heading in re.findall(r"^#+\s+(.*)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


#: A repository path as the pages quote it, in backticks or bare (`quantize/artifact.py`, tests/test_dot.py,
#: golden/data/bof4.json), not the tail of a longer path or address; then, optionally, ``::name``: a test
#: (or class) of that file, which the pages cite as the evidence of a claim.
_REPO_PATH = re.compile(r"(?<![\w./-])((?:golden|quantize|hdl|sim|synth|bench|sop|tests|docs|scripts)/[\w./-]*?"
                        r"\.(?:py|md|json|vlt|sh|toml))(?![\w/-])(?:::(\w+))?")


def broken_links(pages: list[Path]) -> list[str]:
    """Every relative link of ``pages`` whose file or anchor does not exist, every repository path they
    quote (`quantize/artifact.py`, bare or in backticks) that is no file, and every test they cite
    (`tests/test_dot.py::test_name`) that its file does not define."""
    bad = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page.resolve()
            if not target.exists():
                bad.append(f"{page.name}: {link}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                bad.append(f"{page.name}: {link}: no such anchor")
        for path, name in _REPO_PATH.findall(re.sub(r"\]\([^)\s]+\)", "]", text)):   # links: checked above
            if not ROOT.joinpath(path).is_file():
                bad.append(f"{page.name}: `{path}`: no such file")
            elif name and not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b",
                                        ROOT.joinpath(path).read_text(), re.M):
                bad.append(f"{page.name}: `{path}::{name}`: no such test")
    return bad


def test_every_link_and_quoted_path_of_the_docs_resolves(tmp_path):
    pages = [ROOT / "README.md", *sorted(ROOT.joinpath("docs").glob("*.md"))]
    assert broken_links(pages) == []
    # the checker can fail: a heading's anchor that a page does not have, a file, a quoted path
    page = tmp_path / "p.md"
    page.write_text("# Memory (`bench/memory.py`)\n\n[a](#memory-benchmemorypy) [b](#memory) [c](nope.md) "
                    "`quantize/nope.py`, tests/test_dot.py::test_minilm_layers_are_within_the_derived_float64_bound "
                    "and tests/test_dot.py::test_nope; golden/data/nope.json, the tail of a/golden/nope.py\n")
    assert broken_links([page]) == ["p.md: #memory: no such anchor", "p.md: nope.md: no such file",
                                    "p.md: `quantize/nope.py`: no such file",
                                    "p.md: `tests/test_dot.py::test_nope`: no such test",
                                    "p.md: `golden/data/nope.json`: no such file"]


def unresolved_names(pages: list[Path]) -> list[str]:
    """Every name of the package the pages quote in backticks, dotted from a subpackage
    (`golden.dot.tile_order`, `sop.quantize.models.open_model(path)`), that does not import or is no
    attribute of what it names."""
    import importlib

    bad = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for name in re.findall(r"`((?:sop\.)?(?:golden|quantize|hdl|sim|synth)(?:\.\w+)+)(?:\([^`]*\))?`", text):
            parts = ["sop", *name.removeprefix("sop.").split(".")]
            for i in range(len(parts), 1, -1):      # the longest importable module (at least sop.X), then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ModuleNotFoundError:
                    continue
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    bad.append(f"{page.name}: `{name}`: no {attr}")
                    break
                obj = getattr(obj, attr)
    return bad


def test_every_name_of_the_package_the_docs_quote_exists(tmp_path):
    pages = [ROOT / "README.md", *sorted(ROOT.joinpath("docs").glob("*.md"))]
    assert unresolved_names(pages) == []
    # the check can fail: a renamed function, a module that is not there
    page = tmp_path / "p.md"
    page.write_text("`golden.dot.tile_order` and `sop.golden.dot.tile_ordr(rows)`, `quantize.nope.f`\n")
    assert unresolved_names([page]) == ["p.md: `sop.golden.dot.tile_ordr`: no tile_ordr",
                                        "p.md: `quantize.nope.f`: no nope"]


# -- the command lines the pages show ------------------------------------------------------------------------

def sop_command_lines(text: str) -> list[str]:
    """Every `sop` command line in ``text``'s code blocks (`.venv/bin/sop eval ...`, and the synopses,
    `sop eval MODEL [--json FILE] ...`), its continuation lines joined and its comment dropped."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        block = re.sub(r"\s*\\\n\s*", " ", block)                  # a shell continuation
        block = re.sub(r"\n\s+(?=\[|--)", " ", block)               # a synopsis' indented continuation
        lines += [line.split(" #")[0].strip() for line in block.splitlines()
                  if re.match(r"\s*(?:\.venv/bin/)?sop [a-z]", line)]
    return lines


def option_drift(pages: dict[str, str], commands: dict) -> list[str]:
    """What the pages' `sop` command lines get wrong against the parsers ``commands`` (command -> its
    argparse parser): a command or an option that does not exist, and, for a command the pages give a
    synopsis of (a line with optional `[--...]` parts), an option that no synopsis of it names."""
    bad, named = [], {}
    for page, text in pages.items():
        for line in sop_command_lines(text):
            cmd = line.split()[1]
            if cmd not in commands:
                bad.append(f"{page}: `{line}`: no command {cmd}")
                continue
            known = {s for a in commands[cmd]._actions for s in a.option_strings}
            given = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", line))
            bad += [f"{page}: `{line}`: sop {cmd} has no {opt}" for opt in sorted(given - known)]
            if "[--" in line:
                named.setdefault(cmd, set()).update(given)
    for cmd, given in sorted(named.items()):
        missing = {s for a in commands[cmd]._actions for s in a.option_strings if s.startswith("--")} - given
        bad += [f"the synopses of sop {cmd} lack {opt}" for opt in sorted(missing - {"--help"})]
    return bad


def test_every_sop_command_line_of_the_docs_has_its_options():
    """Each `sop` command line of README and docs/ names options that command has, and the synopses
    (`sop eval MODEL --format F [--json FILE] ...`) name every option it has: `sop X --help` and the pages
    agree."""
    from sop.cli import _parser

    _, commands = _parser()
    pages = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.joinpath("docs").glob("*.md"))]}
    assert sum(len(sop_command_lines(t)) for t in pages.values()) > 30     # the lines are found
    assert option_drift(pages, commands) == []
    # the check can fail: a renamed option, an option left out of a synopsis, a command that does not exist
    page = ("```sh\n.venv/bin/sop eval minilm --format sop4-g16 --jsn x.json   # a typo\n"
            "sop report FILE.json [--out STEM]\n"
            ".venv/bin/sop evaluate minilm \\\n    --format nf4-g64\n```\n")
    assert option_drift({"p.md": page}, commands) == [
        "p.md: `.venv/bin/sop eval minilm --format sop4-g16 --jsn x.json`: sop eval has no --jsn",
        "p.md: `.venv/bin/sop evaluate minilm --format nf4-g64`: no command evaluate",
        "the synopses of sop report lack --bpw-tol"]
