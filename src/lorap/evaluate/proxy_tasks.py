"""Offline zero-shot proxy tasks built from the built-in `wiki` test split.

Without a network the seven standard tasks (BoolQ, PIQA, ...) cannot be had, so lorap
builds two local tasks in lm-eval's own format (task YAML + JSONL) and runs them through
the same harness. They are proxies: their numbers are not comparable with published
tables, and every report says so.

  lorap_wiki_cloze   LAMBADA-style: the paragraph without its last word is the context;
                     the model must give the last word (acc = greedy match).
  lorap_wiki_ending  HellaSwag-style: the article up to the middle of its last sentence is
                     the context; pick the true ending of that sentence among three
                     endings taken from other articles (acc and acc_norm).

Everything is a pure function of the corpus: items are chosen and shuffled by SHA-256
of fixed strings (never Python's `random` or `hash`), and files are written with fixed
key order and line endings, so two builds are byte-identical.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ..io.data import wiki_data_file, wiki_documents

BUILD_VERSION = 1  # bump when the construction below changes, so cached builds are redone
CLOZE_TASK = "lorap_wiki_cloze"
ENDING_TASK = "lorap_wiki_ending"
PROXY_TASKS = (CLOZE_TASK, ENDING_TASK)
PROXY_DESCRIPTIONS = {
    CLOZE_TASK: "proxy: predict the last word of a wiki test paragraph (LAMBADA-style)",
    ENDING_TASK: "proxy: pick a wiki sentence's true ending among 3 endings from other articles (HellaSwag-style)",
}

CLOZE_MIN_WORDS = 20
CLOZE_MAX_CONTEXT_WORDS = 200  # bounds the cost per item; 200 words of context is plenty
ENDING_MIN_WORDS = 8  # the sentence that gets cut in two
ENDING_DISTRACTORS = 3
ENDING_MAX_CONTEXT_WORDS = 150
# Items per task. 500 keeps the standard error near 2 points of accuracy while a full run
# of both tasks (500 + 4 x 500 scored continuations) stays minutes, not hours, on a CPU.
MAX_ITEMS = 500
# The last word must be a plain word: numbers and initials are not a word-prediction test.
# A plain space before it, so context + target is the text as written.
_LAST_WORD = re.compile(r"^(.*\S) ([A-Za-z][A-Za-z'\-]*[A-Za-z])[.!?]?[\"')\]]*$", re.S)
# Sentence ends; a period after an initial or a short abbreviation ("C.", "St.") is not one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ABBREVIATION = re.compile(r"(\b[A-Z][a-z]?|\b[a-z]{1,2}|\b(?:[A-Z]\.)+[A-Z])\.$")


def _digest(*parts) -> int:
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest(), 16)


def _tail(text: str, words: int) -> str:
    """The end of `text` holding its last `words` words, whitespace kept as written."""
    starts = [match.start() for match in re.finditer(r"\S+", text)]
    return text[starts[-words]:] if len(starts) > words else text


def cloze_items(documents: list[str]) -> list[dict]:
    items = []
    for number, text in enumerate(documents):
        paragraph = text.split("\n")[0].strip()  # the lead paragraph: one topic, one flow
        match = _LAST_WORD.match(paragraph)
        if not match or len(paragraph.split()) < CLOZE_MIN_WORDS:
            continue
        context = _tail(match.group(1), CLOZE_MAX_CONTEXT_WORDS)
        items.append({"id": f"wiki-test-{number}", "context": context, "target": " " + match.group(2)})
    return items


def sentence_starts(text: str) -> list[int]:
    """Offsets where the sentences of `text` begin (the first is 0)."""
    starts = [0]
    for boundary in _SENTENCE_END.finditer(text):
        if not _ABBREVIATION.search(text[starts[-1] : boundary.start()]):
            starts.append(boundary.end())
    return starts


def _ending_candidates(documents: list[str]) -> list[tuple[int, str, str]]:
    """(document number, context, true ending) for every article whose last sentence is long enough."""
    candidates = []
    for number, text in enumerate(documents):
        paragraph = text.split("\n")[0].strip()
        starts = sentence_starts(paragraph)
        word_starts = [starts[-1] + match.start() for match in re.finditer(r"\S+", paragraph[starts[-1] :])]
        if len(starts) < 2 or len(word_starts) < ENDING_MIN_WORDS:
            continue
        # Cut the last sentence in the middle of its words, text kept as written.
        cut = word_starts[len(word_starts) // 2]
        context = _tail(paragraph[:cut].rstrip(), ENDING_MAX_CONTEXT_WORDS)
        candidates.append((number, context, paragraph[cut:]))
    return candidates


def ending_items(documents: list[str]) -> list[dict]:
    candidates = _ending_candidates(documents)
    items = []
    for index, (number, context, ending) in enumerate(candidates):
        distractors: list[str] = []
        attempt = 0
        while len(distractors) < ENDING_DISTRACTORS:
            other = candidates[_digest("distractor", number, attempt) % len(candidates)]
            attempt += 1
            if other[0] != number and other[2] != ending and other[2] not in distractors:
                distractors.append(other[2])
        label = _digest("label", number) % (ENDING_DISTRACTORS + 1)
        choices = distractors[:label] + [ending] + distractors[label:]
        items.append({"id": f"wiki-test-{number}", "context": context, "choices": choices, "label": label})
    return items


_CLOZE_YAML = """\
# Built by lorap (proxy task, build {version}); not a published benchmark.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: {version}
"""

_ENDING_YAML = """\
# Built by lorap (proxy task, build {version}); not a published benchmark.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def _select(items: list[dict]) -> list[dict]:
    """At most MAX_ITEMS, spread over the whole split (chosen by a hash of the item id), in corpus order."""
    if len(items) <= MAX_ITEMS:
        return items
    chosen = set(sorted(range(len(items)), key=lambda i: _digest("select", items[i]["id"]))[:MAX_ITEMS])
    return [item for i, item in enumerate(items) if i in chosen]


def _jsonl(items: list[dict]) -> bytes:
    lines = [json.dumps(item, ensure_ascii=False, sort_keys=True) for item in items]
    return ("\n".join(lines) + "\n").encode("utf-8")


def build_proxy_tasks(folder: Path, final_folder: Path | None = None) -> dict:
    """Write both tasks (YAML + JSONL) into `folder`; returns {task: {"yaml", "data", "items"}}.

    The YAML names its data by absolute path (lm-eval resolves relative paths against the
    working directory, not the YAML), so a build made in a temporary folder that will be
    renamed is told its `final_folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final_folder = Path(final_folder or folder).resolve()
    documents = wiki_documents("test")
    built = {}
    for task, template, items in (
        (CLOZE_TASK, _CLOZE_YAML, _select(cloze_items(documents))),
        (ENDING_TASK, _ENDING_YAML, _select(ending_items(documents))),
    ):
        data = folder / f"{task}.jsonl"
        yaml = folder / f"{task}.yaml"
        data.write_bytes(_jsonl(items))
        # json.dumps quotes the path so any character in it is valid YAML.
        yaml.write_bytes(template.format(task=task, data=json.dumps(str(final_folder / data.name)), version=BUILD_VERSION).encode())
        built[task] = {"yaml": str(yaml), "data": str(data), "items": len(items)}
    return built


def proxy_task_folder() -> Path:
    """The cached build, made on first use: one folder per (build version, corpus file contents)."""
    from ..io.default_model import cache_root

    corpus = hashlib.sha256(wiki_data_file().read_bytes()).hexdigest()[:12]
    target = cache_root() / "tasks" / f"wiki-proxies-v{BUILD_VERSION}-{corpus}"
    if all((target / f"{task}.yaml").is_file() for task in PROXY_TASKS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder, then renamed: a concurrent or interrupted build never
    # leaves a half-written task behind.
    tmp = Path(tempfile.mkdtemp(prefix=".tasks-tmp-", dir=target.parent))
    try:
        build_proxy_tasks(tmp, final_folder=target)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; its build is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
