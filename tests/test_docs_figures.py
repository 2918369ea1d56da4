"""Every measured figure the README and the guides quote comes from one record, and says which.

Records are the sections of docs/records/*.md between `<!-- BEGIN name -->` and `<!-- END name -->`,
each written by the command docs/records/README.md names; the guides (GUIDES) hold no such section
and narrate no development. The convention for quoting one:

* A table row, a list item or a paragraph that quotes measured figures carries a source tag, a link
  whose text is `page.md#section` (or `records/page.md#section`, `docs/records/page.md#section`), e.g.
  `[benchmarks.md#compare_main](docs/records/benchmarks.md)`.
* Every number in that unit (outside inline code, link targets and the tags themselves; a number
  glued to a word, like `7B`, `f16` or `LLaMA-2`, is a name, not a figure) must appear, written the
  same way (`31.19`, `1.25x`, `46,080`, `20%`), in the text of at least one section the unit names.
  So a figure rounded differently, or moved from another protocol, fails.
* `lorap plan`'s output is quoted as a fenced block whose first line is `$ lorap plan ARGS` (with
  `--no-speed`) and whose other lines are lines of its output; the test runs the command.

The same pages must not narrate development: no issue references (`#123`), commit hashes or
"session".
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECORDS = DOCS / "records"
# The pages a user reads, held to the conventions above: the README and every page of docs/ (the
# records live in docs/records/).
GUIDES = ["README.md", "docs/getting-started.md", "docs/concepts.md", "docs/options.md", "docs/evaluation.md",
          "docs/recovery.md", "docs/serving.md", "docs/scaling.md", "docs/architecture.md"]

TAG = re.compile(r"\[(?:docs/)?(?:records/)?(?P<page>[\w.-]+\.md)#(?P<section>[\w-]+)\]\([^)]*\)")
# A figure: digits (with thousands commas and decimals), then an optional unit; not part of a word.
FIGURE = re.compile(r"(?<![\w.,])(?<![A-Za-z]-)\d{1,3}(?:,\d{3})+(?:\.\d+)?[x%]?(?![\w]|[.,]\d)"
                    r"|(?<![\w.,])(?<![A-Za-z]-)\d+(?:\.\d+)?[x%]?(?![\w]|[.,]\d)")
SECTION = re.compile(r"<!-- BEGIN (?P<name>[\w-]+) -->(?P<text>.*?)<!-- END (?P=name) -->", re.S)


def records() -> dict:
    """{(page, section): its text} for every record section in docs/records/ (page: the file's name)."""
    found = {}
    for page in sorted(RECORDS.glob("*.md")):
        for match in SECTION.finditer(page.read_text()):
            found[(page.name, match["name"])] = match["text"]
    return found


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def units(text: str) -> list[str]:
    """Table rows, list items and paragraphs, outside code blocks."""
    found, current = [], []
    for line in prose(text).splitlines():
        starts_item = re.match(r"\s*([-*]|\d+\.)\s", line)
        if not line.strip() or line.lstrip().startswith("|") or starts_item:
            if current:
                found.append(" ".join(current))
            current = []
            if line.lstrip().startswith("|"):
                found.append(line)
                continue
        if line.strip():
            current.append(line.strip())
    if current:
        found.append(" ".join(current))
    return found


def figures(unit: str) -> list[str]:
    text = TAG.sub(" ", unit)
    text = re.sub(r"`[^`]*`", " ", text)  # commands and option values are not figures
    text = re.sub(r"\]\([^)]*\)", "] ", text)  # link targets
    return FIGURE.findall(text)


def quoted_in(figure: str, text: str) -> bool:
    return re.search(r"(?<![\w.,])" + re.escape(figure) + r"(?![\d]|[.,]\d)", text) is not None


def tagged_units():
    for page in GUIDES:
        for unit in units((ROOT / page).read_text()):
            tags = [(m["page"], m["section"]) for m in TAG.finditer(unit)]
            if tags:
                yield page, unit, tags


def test_the_conventions_find_what_they_should():
    assert figures("| perplexity | 20.51 | 31.19 | 128-token windows, first 16,384 | 1.25x / 1.14x | 20% |") == [
        "20.51", "31.19", "128", "16,384", "1.25x", "1.14x", "20%"]
    assert figures("LLaMA-2-7B in f16 on an H200, batch-1, `--ratio 0.2`, [x](docs/a2.md), 5e-5") == []
    assert quoted_in("1.14x", "decode **1.14x** [1.08-1.22]") and not quoted_in("1.1", "1.14x")
    assert not quoted_in("31.1", "31.19") and not quoted_in("19", "31.19") and quoted_in("20%", "exact-20% rows")
    assert units("a\nb [p.md#s](x)\n\n- one\n  two\n| r | 1 |\nc") == ["a b [p.md#s](x)", "- one two", "| r | 1 |", "c"]


def test_every_guide_quotes_figures_from_records():
    assert any(page == "README.md" for page, _, _ in tagged_units()), "the README quotes no record"


@pytest.mark.parametrize("page,unit,tags", list(tagged_units()), ids=lambda value: str(value)[:60])
def test_a_quoted_figure_is_in_the_record_it_names(page, unit, tags):
    sections = records()
    missing = [f"{p}#{s}" for p, s in tags if (p, s) not in sections]
    assert not missing, f"{page}: no record section {missing} (docs/records/README.md lists them)"
    text = "\n".join(sections[tag] for tag in tags)
    wrong = [figure for figure in figures(unit) if not quoted_in(figure, text)]
    assert figures(unit), f"{page}: a source tag on a line that quotes no figure: {unit[:120]}"
    assert not wrong, (f"{page}: {wrong} not found in {', '.join(f'{p}#{s}' for p, s in tags)}, "
                       f"where this text says they come from: {unit[:200]}")


def test_the_readme_what_to_expect_table_names_a_record_on_every_row():
    readme = (ROOT / "README.md").read_text()
    part = readme.split("## What to expect", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")][2:]
    assert rows and all(TAG.search(row) for row in rows), "every row of the table names its record"


def plan_blocks():
    for page in GUIDES:
        text = (ROOT / page).read_text()
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
            lines = block.rstrip("\n").splitlines()
            if lines and lines[0].startswith("$ lorap plan "):
                yield page, lines[0][len("$ lorap plan "):], lines[1:]


@pytest.mark.parametrize("page,args,expected", list(plan_blocks()), ids=lambda value: str(value)[:60])
def test_quoted_plan_output_is_what_lorap_plan_prints(page, args, expected):
    assert "--no-speed" in args.split(), "a quoted plan must not depend on this machine's speed"
    run = subprocess.run([sys.executable, "-m", "lorap.cli", "plan", *args.split()], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = {" ".join(line.split()) for line in (run.stdout + run.stderr).splitlines()}
    absent = [line for line in expected if " ".join(line.split()) not in printed]
    assert not absent, f"{page}: `lorap plan {args}` no longer prints {absent}"


def test_the_guides_do_not_narrate_development():
    for page in GUIDES:
        text = (ROOT / page).read_text()
        bare = re.sub(r"\]\([^)]*\)|https?://\S+", " ", text)  # URLs and link targets may hold anchors
        assert not re.findall(r"(?<![\w&/])#\d+\b", bare), f"{page}: an issue reference"
        hashes = [word for word in re.findall(r"\b[0-9a-f]{7,40}\b", bare)
                  if re.search(r"\d", word) and re.search(r"[a-f]", word)]
        assert not hashes, f"{page}: commit hashes {hashes}"
        assert not re.search(r"\bsessions?\b", text, re.I), f"{page}: the word 'session'"
        assert not re.search(r"today's best|method\.md|\.\./shared", text, re.I), f"{page}: a reference a reader cannot follow"


def test_every_page_of_docs_is_a_guide_or_a_record():
    pages = {str(page.relative_to(ROOT)) for page in DOCS.glob("*.md")}
    assert pages == set(GUIDES) - {"README.md"}, "a page of docs/ is a guide (in GUIDES) or belongs in docs/records/"
    for page in GUIDES:
        assert not re.search(r"^<!-- BEGIN \S+ -->$", (ROOT / page).read_text(), re.M), \
            f"{page}: a marked section belongs in docs/records/"


def test_a_tag_links_to_the_record_it_names():
    for page in GUIDES:
        for unit in units((ROOT / page).read_text()):
            for match in TAG.finditer(unit):
                target = re.search(r"\(([^)#]*)", match[0])[1]
                assert (ROOT / page).parent.joinpath(target).resolve() == RECORDS / match["page"], \
                    f"{page}: {match[0]} links elsewhere than the record it names"


def test_relative_links_of_the_guides_and_records_resolve():
    pages = [ROOT / page for page in GUIDES] + sorted(RECORDS.glob("*.md"))
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
            path = target.split("#", 1)[0]
            if path and not re.match(r"[a-z]+:", path) and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
