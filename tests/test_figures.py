"""The docs' figures against the JSON they came from (scripts/check_figures.py, list in docs/figures.json): no model
is loaded, only text and JSON are read."""

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_figures", ROOT / "scripts/check_figures.py")
check_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_figures)


def _docs_copy(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for doc in (ROOT / "docs").glob("*.md"):
        shutil.copy(doc, tmp_path / "docs" / doc.name)
    return tmp_path


def test_every_figure_matches_its_json():
    assert check_figures.check() == []


def test_every_doc_is_covered():
    table = json.loads(check_figures.TABLE.read_text())
    docs = {"README.md"} | {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} - {"docs/DESIGN.md"}
    assert set(table["covered"]) == docs
    assert sum(doc == "README.md" for doc, *_ in table["figures"]) >= 30


def test_a_changed_figure_fails(tmp_path):
    root = _docs_copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    old = "decode on this CPU 0.72x dense tok/s at batch 1"
    assert old in text
    readme.write_text(text.replace(old, "decode on this CPU 0.80x dense tok/s at batch 1"))
    errors = check_figures.check(root)
    assert any("text not found" in e and "{0.72}" in e for e in errors), errors
    assert any("README.md:" in e and "'0.80'" in e for e in errors), errors  # the new figure has no source either


def test_a_figure_that_is_not_its_field_fails(tmp_path):
    table = {"figures": [["README.md", "decode on this CPU {0.80}x dense",
                          "fastpaths-default-torch.json:records[config=lossless,batch=1].speed_vs_dense"]],
             "not_measured": [], "skip": [], "covered": []}
    (tmp_path / "README.md").write_text("decode on this CPU 0.80x dense (docs/results/fastpaths-default-torch.json)")
    assert check_figures.check(tmp_path, table) == [
        "README.md: 0.80 is 0.72 in fastpaths-default-torch.json:records[config=lossless,batch=1].speed_vs_dense "
        "(0.7154567999388671)"]


def test_an_uncited_json_and_an_unlisted_figure_fail(tmp_path):
    table = {"figures": [["README.md", "decode {0.72}x dense",
                          "fastpaths-default-torch.json:records[config=lossless,batch=1].speed_vs_dense"]],
             "not_measured": [], "skip": [], "covered": ["README.md"]}
    (tmp_path / "README.md").write_text("decode 0.72x dense, and 9.99 tok/s from nowhere")
    errors = check_figures.check(tmp_path, table)
    assert errors == ["README.md: quotes fastpaths-default-torch.json without naming it",
                      "README.md:1: '9.99' is neither in `figures` nor in `not_measured`"]


def test_written_as_the_figure_is():
    assert check_figures.written(0.7154567999388671, "0.72") == "0.72"
    assert check_figures.written(-0.0001, "+0.00") == "0.00"
    assert check_figures.written(269030016, "269,030,016") == "269,030,016"
    assert check_figures.written(6.86884050082881e-06, "6.87e-06") == "6.87e-06"
    src = "100 * {fastpaths-default-torch.json:records[config=sparse50,batch=1].measured_fraction}"
    assert check_figures.value(src) == 100 * 0.9045364514270408
