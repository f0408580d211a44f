"""README.md and docs/ tell the truth: the set-up commands, the generated flags tables, the links, and
nothing of the repository's own development set-up outside docs/development.md."""
import re

import pytest

from dtrain.config import flags_markdown, resume_rules_markdown
from dtrain.helptable import argparse_markdown
from helpers import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
USER_PAGES = [p for p in PAGES if p.name != "development.md"]


def text(path) -> str:
    return path.read_text()


def rel(path) -> str:
    return str(path.relative_to(REPO))


def test_the_pages_exist():
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"training.md", "launching.md", "kaggle.md", "datasets-and-models.md", "performance.md",
            "development.md", "export.md"} <= names


def test_flags_table_is_current():
    assert flags_markdown() in text(DOCS / "training.md"), \
        "docs/training.md's flags table is stale: paste `python -m dtrain.config` into it"


def test_resume_rules_are_current():
    """The list of what a resumed run may change is generated from the Config fields' policies."""
    assert f"<!-- resume-rules -->\n{resume_rules_markdown()}\n<!-- /resume-rules -->" in text(DOCS / "training.md"), \
        "docs/training.md's resume rules are stale: paste `python -m dtrain.config resume-rules` into it"


def test_predict_flags_table_is_current():
    from dtrain.predict import build_parser
    assert argparse_markdown(build_parser()) in text(DOCS / "kaggle.md"), \
        "docs/kaggle.md's flags table is stale: paste `python -m dtrain.helptable dtrain.predict:build_parser` into it"


def test_export_flags_table_is_current():
    from dtrain.export import build_parser
    assert argparse_markdown(build_parser()) in text(DOCS / "export.md"), \
        "docs/export.md's flags table is stale: paste `python -m dtrain.helptable dtrain.export:build_parser` into it"


def test_argparse_markdown_lists_every_flag_with_its_default():
    import argparse
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("source", help="a file")
    p.add_argument("--size", type=int, default=3, help="size in px")
    p.add_argument("--mode", choices=["a", "b"], default="a", help="the mode")
    p.add_argument("--flag", default=True, action=argparse.BooleanOptionalAction, help="on or off")
    p.add_argument("--out", required=True, help="where | how")
    p.add_argument("--hidden", help=argparse.SUPPRESS)
    assert argparse_markdown(p).splitlines() == [
        "| flag | default | what |",
        "| --- | --- | --- |",
        "| `SOURCE` | (required) | a file |",
        "| `--size` | `3` | size in px |",
        "| `--mode` | `a` | the mode (a \\| b) |",
        "| `--flag / --no-flag` | `True` | on or off |",
        "| `--out` | (required) | where \\| how |",
    ]


def test_readme_is_short():
    lines = len(text(README).splitlines())
    assert lines <= 200, f"README.md has {lines} lines: move details to docs/"


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_them():
    first = re.search(r"```(\w*)\n(.*?)```", text(README), re.S)
    assert first.group(1) == "bash", "the README's first code block is the set-up"
    first_block = first.group(2).strip().splitlines()
    assert len(first_block) == 2
    train_cmd, test_cmd = (line.split("#")[0].strip() for line in first_block)
    assert train_cmd.startswith("pip install -e .") and "dtrain/main.py" in train_cmd
    ci = (REPO / ".ci" / "run").read_text()
    for part in test_cmd.split("&&"):
        part = part.strip().replace("pip install", "python3 -m pip install --quiet").replace("python -m", "python3 -m")
        assert part in ci, f"{part!r} (README's test command) is not what .ci/run runs"
    assert "python3 -m pytest -q --slow" in ci, ".ci/run leaves out the tests marked slow: pass --slow"


@pytest.mark.parametrize("page", USER_PAGES, ids=rel)
def test_user_pages_do_not_name_the_development_data_folder(page):
    body = text(page)
    assert "shared/data" not in body, f"{rel(page)}: the development data folder belongs in docs/development.md"
    assert not re.search(r"(?<!dtrain/)\bexport\.py", body), \
        f"{rel(page)}: the development data's export.py belongs in docs/development.md"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_pages_speak_of_the_product_not_of_its_development(page):
    body = text(page).lower()
    for phrase in ("this session", "the session", "the issue's", "was lent", "no gpu machine", "todo"):
        assert phrase not in body, f"{rel(page)} says {phrase!r}"


def anchors(page) -> set:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    body = re.sub(r"```.*?```", "", text(page), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", body, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_to_existing_files_and_anchors(page):
    body = re.sub(r"```.*?```", "", text(page), flags=re.S)
    body = re.sub(r"`[^`\n]*`", "", body)
    for target in re.findall(r"\]\(([^)\s]+)\)", body):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{rel(page)}: link {target!r} points to a missing file"
        if anchor:
            assert anchor in anchors(dest), f"{rel(page)}: link {target!r}: no such heading in {dest.name}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_table_row_has_one_cell_per_column(page):
    """An unescaped | (e.g. in `a|b` inside a cell) splits a cell and shifts the rest of the row."""
    body = re.sub(r"```.*?```", "", text(page), flags=re.S)
    for table in re.findall(r"(?:^\|.*\n)+", body, re.M):
        rows = table.splitlines()
        widths = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) == 1, f"{rel(page)}: a table's rows have different numbers of cells:\n{table}"


def test_what_survives_what_names_a_test_for_every_row_and_each_test_exists():
    text = (DOCS / "launching.md").read_text()
    table = text[text.index("## What survives what"):]
    table = table[:table.index("\n## ")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| what", "| ---"))]
    assert len(rows) >= 9
    for row in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", row)
        assert named, f"no test backs this row: {row[:80]}"
        for path, name in named:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name} does not exist"
