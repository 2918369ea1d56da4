"""docs/records/README.md, the index of the records' marked sections, against the markers themselves and the
scripts' SECTIONS declarations (benchmarks/index.py): every section has the command that writes it,
and every command a section."""
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import index  # noqa: E402
import recovery  # noqa: E402


def test_every_marked_section_has_an_entry():
    missing = sorted(set(index.sections_in_docs()) - set(index.entries()))
    assert not missing, f"sections in docs/ that no script declares (SECTIONS) and BY_HAND does not list: {missing}"


def test_every_entry_names_a_marked_section():
    stale = sorted(set(index.entries()) - set(index.sections_in_docs()))
    assert not stale, f"declared sections with no marker in docs/: {stale}"


def test_records_page_is_what_the_index_writes():
    assert index.INDEX.read_text() == index.render(), "run .venv/bin/python benchmarks/index.py"


def test_every_script_that_writes_a_section_declares_it():
    writers = [script for script in BENCHMARKS.rglob("*.py")
               if "update_section(" in script.read_text() and script.name != "common.py"]
    assert writers and all(index.declared(script) for script in writers), \
        [str(script) for script in writers if not index.declared(script)]


def test_recovery_table_builds_the_command_each_section_quotes():
    docs = (index.RECORDS / "recovery.md").read_text()
    for section in recovery.SECTIONS:
        body = re.search(f"<!-- BEGIN {section} -->(.*?)<!-- END {section} -->", docs, re.S).group(1)
        quoted = re.search(r"```\n(.*?)\n```", body).group(1)
        assert recovery.command(recovery.parse(["--section", section])) == quoted, section


def test_options_beside_a_section_override_its_table():
    args = recovery.parse(["--section", "recovery-best-50-kd", "--minutes", "5"])
    assert (args.minutes, args.ratio, args.calibration) == (5.0, 0.5, "wiki+perldoc")


def test_every_marked_section_is_in_a_record_page():
    outside = sorted(f"{section} ({page})" for section, page in index.sections_in_docs().items()
                     if not (index.DOCS / page).is_relative_to(index.RECORDS))
    assert not outside, f"marked sections outside docs/records/ (the guides in docs/ hold none): {outside}"
