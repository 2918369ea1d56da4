"""Writes docs/records/README.md, the index of the records: every marked section of docs/records/
(`<!-- BEGIN name -->` ... `<!-- END name -->`), the script that writes it, and the one command that
re-measures it.

The commands come from each script's SECTIONS declaration (see common.py), read as a literal without
importing the script (most import torch); a section no script writes is listed in BY_HAND.
tests/test_benchmarks_index.py fails when a marker has no entry, an entry has no marker, a marker sits
outside docs/records/ (the guides in docs/ hold none), or docs/records/README.md is not what this writes.

    .venv/bin/python benchmarks/index.py
"""
import ast
import os
import re
import sys
from dataclasses import dataclass

from common import BENCHMARKS, DOCS, RECORDS, ROOT

INDEX = RECORDS / "README.md"
ARCHIVE = BENCHMARKS / "archive"
# Sections that no script writes, with what stands in for their command.
BY_HAND = {
    "recovery": "by hand, the `lorap` commands in the section itself; superseded by the other sections of recovery.md",
    "scaling-default-in-memory": "by hand, the `lorap compress` command in the section itself",
    "lowrank-analysis": "by hand, the `lorap analyze` command in the section itself",
}


@dataclass(frozen=True)
class Entry:
    command: str
    note: str
    frozen: bool  # evidence measured once (an archived script's, or by hand), not kept current


def declared(script) -> dict:
    """The script's SECTIONS literal, {} where it declares none."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "SECTIONS" for target in node.targets):
            return ast.literal_eval(node.value)
    return {}


def entries() -> dict:
    """{section: Entry} of every script's declaration, and BY_HAND's."""
    found = {section: Entry(how, "", True) for section, how in BY_HAND.items()}
    for script in sorted(BENCHMARKS.rglob("*.py")):
        for section, value in declared(script).items():
            arguments, note = (value, "") if isinstance(value, str) else value
            if section in found:
                raise ValueError(f"section {section} is declared twice (again in {script})")
            command = " ".join([".venv/bin/python", str(script.relative_to(ROOT)), arguments]).rstrip()
            found[section] = Entry(f"`{command}`", note, script.is_relative_to(ARCHIVE))
    return found


def sections_in_docs() -> dict:
    """{section: the page it is on, relative to docs/}, pages in name order, sections in page order; every
    page of docs/ is read, so that a marker outside docs/records/ is found too."""
    found = {}
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for name in re.findall(r"^<!-- BEGIN (\S+) -->$", text, re.M):
            if f"\n<!-- END {name} -->" not in text:
                raise ValueError(f"{page}: section {name} has no END marker")
            if name in found:
                raise ValueError(f"section {name} is on {found[name]} and on {page}")
            found[name] = str(page.relative_to(DOCS))
    return found


def render() -> str:
    listed, pages = entries(), {}
    for section, page in sections_in_docs().items():
        pages.setdefault(page, []).append(section)
    lines = [
        "# Records: the command behind every section",
        "",
        "The pages in this folder are records: measured tables, each with the command, commit, date and machine "
        "that produced it, and notes on what was measured when. The guides in `docs/` describe what lorap does "
        "and link here for the figures.",
        "",
        "Each table in these pages sits between `<!-- BEGIN name -->` and `<!-- END name -->` markers and is "
        "written by one command, listed here. `current`: re-run the command to refresh the section. `frozen`: "
        "evidence measured once, whose script is kept in `benchmarks/archive/` (its README says what each "
        "measured) or which was written by hand; its text stays as measured.",
        "",
        "Written by `.venv/bin/python benchmarks/index.py` from each script's `SECTIONS`; "
        "`tests/test_benchmarks_index.py` checks it against the markers.",
    ]
    for page, sections in pages.items():
        link = os.path.relpath(DOCS / page, INDEX.parent)
        lines += ["", f"## [{link}]({link})", "", "| section | re-measured by | kept |", "|---|---|---|"]
        for section in sections:
            entry = listed.get(section)
            if entry is None:
                lines.append(f"| `{section}` | no entry | |")
                continue
            command = entry.command + (f" ({entry.note})" if entry.note else "")
            lines.append(f"| `{section}` | {command} | {'frozen' if entry.frozen else 'current'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    INDEX.write_text(render())
    print(f"wrote {INDEX}", file=sys.stderr)


if __name__ == "__main__":
    main()
