"""Corpora: the built-in wiki split, calibration samples, evaluation windows, hub and local sources."""
import json
import time

import pytest
import torch

from lorap.io import data
from lorap.io.data import (
    DOCUMENT_SEPARATOR,
    calibration_samples,
    evaluation_windows,
    load_documents,
    token_stream,
    wiki_data_file,
    wiki_documents,
    wiki_split_of,
)
from lorap.errors import LorapError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _occurrences(stream: torch.Tensor, window: torch.Tensor) -> list[int]:
    """Every offset at which `window` occurs in `stream` (vectorised over candidate starts)."""
    n = window.numel()
    starts = (stream[: stream.numel() - n + 1] == window[0]).nonzero().flatten()
    if starts.numel() == 0:
        return []
    candidates = stream[starts[:, None] + torch.arange(n)]
    return starts[(candidates == window).all(dim=1)].tolist()


# ---------------------------------------------------------------- the built-in wiki split


@pytest.fixture(scope="module")
def wiki_articles():
    return json.loads(wiki_data_file().read_text(encoding="utf-8"))


def test_wiki_split_is_a_deterministic_function_of_the_title(wiki_articles):
    titles = sorted(wiki_articles)
    first = [wiki_split_of(title) for title in titles]
    again = [wiki_split_of(title) for title in reversed(titles)][::-1]
    assert first == again
    assert set(first) == {"train", "test"}
    share = first.count("test") / len(titles)
    assert 0.08 <= share <= 0.12, share
    # Pinned: the split must never move silently, or perplexities stop being comparable.
    assert len(titles) == 10033
    assert first.count("test") == 1055


def test_wiki_documents_follow_the_split_and_are_disjoint(wiki_articles):
    test_docs, train_docs = wiki_documents("test"), wiki_documents("train")
    expected = {"train": [], "test": []}
    for title in sorted(wiki_articles):
        text = wiki_articles[title].get("extract", "").strip()
        if text:
            expected[wiki_split_of(title)].append(text)
    assert test_docs == expected["test"]
    assert train_docs == expected["train"]
    assert not set(test_docs) & set(train_docs)
    assert 0.08 <= len(test_docs) / (len(test_docs) + len(train_docs)) <= 0.12
    assert wiki_documents("test") == test_docs  # stable across calls


def test_wiki_validation_is_a_fixed_twentieth_of_train_and_never_test(wiki_articles):
    validation = wiki_documents("validation")
    train, test = set(wiki_documents("train")), set(wiki_documents("test"))
    # Settings chosen on it never see a test token; it stays inside train so that calibration,
    # which draws from train, is what it was before the split existed.
    assert validation and set(validation) <= train and not set(validation) & test
    assert 0.04 <= len(validation) / len(train) <= 0.06
    expected = [wiki_articles[t]["extract"].strip() for t in sorted(wiki_articles)
                if data.wiki_is_validation(t) and wiki_articles[t].get("extract", "").strip()]
    assert validation == expected
    assert len(validation) == 465  # pinned: validation perplexities stay comparable


def test_perplexity_reads_the_split_it_is_asked_for(tiny_tokenizer):
    windows = evaluation_windows(tiny_tokenizer, "wiki", seqlen=32, max_tokens=256, split="validation")
    stream = token_stream(tiny_tokenizer, "wiki", "validation")
    assert torch.equal(windows.flatten(), stream[:256])
    assert not torch.equal(windows, evaluation_windows(tiny_tokenizer, "wiki", seqlen=32, max_tokens=256))
    with pytest.raises(LorapError, match="validation or test split, not 'train'"):
        evaluation_windows(tiny_tokenizer, "wiki", seqlen=32, split="train")


def test_wiki_documents_do_not_depend_on_the_order_of_the_json(wiki_articles, tmp_path, monkeypatch):
    reversed_file = tmp_path / "summaries_reversed.json"
    reversed_file.write_text(json.dumps(dict(reversed(list(wiki_articles.items())))), encoding="utf-8")
    expected = wiki_documents("test")
    monkeypatch.setattr(data, "wiki_data_file", lambda: reversed_file)
    assert wiki_documents("test") == expected


def test_pydocs_split_by_path_is_deterministic_disjoint_and_complete(tmp_path, monkeypatch):
    for number in range(40):
        page = tmp_path / ("library" if number % 2 else "howto") / f"page{number}.rst.txt"
        page.parent.mkdir(exist_ok=True)
        page.write_text(f"Page {number}\n=======\n\nText of page {number}.\n", encoding="utf-8")
    (tmp_path / "empty.rst.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.html").write_text("not a source", encoding="utf-8")
    monkeypatch.setenv("LORAP_PYDOCS_DIR", str(tmp_path))
    test, train = data.load_documents("pydocs", "test"), data.load_documents("pydocs", "train")
    assert test and train and not set(test) & set(train) and len(test) + len(train) == 40
    assert data.load_documents("pydocs", "validation") == train  # the half that is not test
    assert test == data.load_documents("pydocs", "test")
    for text in test:
        number = int(text.split()[1])
        folder = "library" if number % 2 else "howto"
        assert data.pydocs_split_of(f"{folder}/page{number}.rst.txt") == "test"


def test_pydocs_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAP_PYDOCS_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("LORAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "PYDOCS_SOURCES", data.Path("nowhere/_sources"))
    with pytest.raises(LorapError, match="get_pydocs.sh"):
        data.load_documents("pydocs", "test")


def test_the_real_pydocs_corpus_when_fetched():
    try:
        folder = data.pydocs_folder()
    except LorapError:
        pytest.skip("pydocs not fetched (bash scripts/get_pydocs.sh)")
    assert len(list(folder.rglob("*.rst.txt"))) == 497  # python3.11-doc 3.11.2
    assert (len(data.load_documents("pydocs", "train")), len(data.load_documents("pydocs", "test"))) == (251, 246)


def test_bad_split_and_unknown_corpus():
    with pytest.raises(ValueError):
        load_documents("wiki", "dev")
    with pytest.raises(LorapError, match="unknown corpus 'nosuch'.*wiki"):
        load_documents("nosuch", "test")


# ---------------------------------------------------------------- token stream and windows


def test_token_stream_is_the_joined_split_tokenized_once(tiny_tokenizer):
    stream = token_stream(tiny_tokenizer, "wiki", "test")
    direct = tiny_tokenizer(DOCUMENT_SEPARATOR.join(wiki_documents("test")))["input_ids"]
    assert stream.dtype == torch.long and stream.dim() == 1
    assert stream.tolist() == direct
    assert token_stream(tiny_tokenizer, "wiki", "test") is stream  # cached, not re-tokenized


def _one_call(tokenizer, documents):
    return torch.tensor(tokenizer(data.DOCUMENT_SEPARATOR.join(documents), verbose=False)["input_ids"])


def test_tokenizing_in_pieces_equals_one_call_on_the_joined_text(tiny_tokenizer):
    from lorap.io.default_model import default_model_dir
    from transformers import AutoTokenizer

    documents = data.wiki_documents("test")[:300]
    for tokenizer in (tiny_tokenizer, AutoTokenizer.from_pretrained(default_model_dir())):
        pieces = data.tokenize_joined(tokenizer, documents, piece_characters=2_000)  # about 30 cuts
        assert torch.equal(pieces, _one_call(tokenizer, documents))


def test_a_tokenizer_that_marks_every_call_is_tokenized_in_one_call(monkeypatch):
    """SentencePiece-style prefix spaces would change the tokens at every cut: the check sees it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    documents = data.wiki_documents("test")[:100]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    calls = []
    real = data._cuts_are_safe
    monkeypatch.setattr(data, "_cuts_are_safe", lambda *args: calls.append(real(*args)) or calls[-1])
    assert torch.equal(data.tokenize_joined(tokenizer, documents, piece_characters=2_000), _one_call(tokenizer, documents))
    assert calls == [False]


def test_evaluation_windows_are_consecutive_and_drop_the_tail(tiny_tokenizer):
    stream = token_stream(tiny_tokenizer, "wiki", "test")
    windows = evaluation_windows(tiny_tokenizer, "wiki", seqlen=48, max_tokens=1000)
    assert windows.shape == (1000 // 48, 48)  # 20 windows; the last 40 tokens are dropped
    for i, window in enumerate(windows):
        assert torch.equal(window, stream[i * 48 : (i + 1) * 48])
    full = evaluation_windows(tiny_tokenizer, "wiki", seqlen=512)
    assert full.shape == (stream.numel() // 512, 512)
    assert torch.equal(full.flatten(), stream[: full.numel()])


def test_evaluation_windows_errors(tiny_tokenizer):
    with pytest.raises(LorapError, match=r"has 100 tokens within --max-tokens 100, fewer than one window of 128"):
        evaluation_windows(tiny_tokenizer, "wiki", seqlen=128, max_tokens=100)
    for bad in (0, -4):
        with pytest.raises(LorapError, match="seqlen must be a positive integer"):
            evaluation_windows(tiny_tokenizer, "wiki", seqlen=bad)
        with pytest.raises(LorapError, match="max tokens must be a positive integer"):
            evaluation_windows(tiny_tokenizer, "wiki", seqlen=16, max_tokens=bad)


# ---------------------------------------------------------------- calibration samples


def test_calibration_samples_are_seeded(tiny_tokenizer):
    a = calibration_samples(tiny_tokenizer, "wiki", n_samples=8, seqlen=64, seed=0)
    b = calibration_samples(tiny_tokenizer, "wiki", n_samples=8, seqlen=64, seed=0)
    c = calibration_samples(tiny_tokenizer, "wiki", n_samples=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Different seeds pick (almost entirely) different windows, not a permutation of the same ones.
    assert len({tuple(r) for r in a.tolist()} & {tuple(r) for r in c.tolist()}) < 8


def test_calibration_samples_are_distinct_non_overlapping_train_windows(tiny_tokenizer):
    seqlen = 64
    samples = calibration_samples(tiny_tokenizer, "wiki", n_samples=16, seqlen=seqlen, seed=3)
    train = token_stream(tiny_tokenizer, "wiki", "train")
    offsets = []
    for sample in samples:
        found = _occurrences(train, sample)
        assert len(found) == 1, f"a sample occurs {len(found)} times in the train stream"
        offsets.append(found[0])
    offsets.sort()
    assert len(set(offsets)) == 16
    assert all(later - earlier >= seqlen for earlier, later in zip(offsets, offsets[1:])), offsets


def test_calibration_samples_too_few_tokens(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("A short text. " * 20, encoding="utf-8")
    tokens = len(tiny_tokenizer(corpus.read_text(encoding="utf-8"))["input_ids"])
    assert 64 <= tokens < 4 * 64
    with pytest.raises(LorapError) as err:
        calibration_samples(tiny_tokenizer, str(corpus), n_samples=4, seqlen=64)
    message = str(err.value)
    assert f"has {tokens} tokens" in message
    assert "4 x 64 = 256 tokens were asked for" in message
    # Exactly as many windows as there are is fine.
    fits = tokens // 64
    assert calibration_samples(tiny_tokenizer, str(corpus), n_samples=fits, seqlen=64).shape == (fits, 64)


@pytest.mark.parametrize("settings", [{"n_samples": 0}, {"seqlen": 0}, {"seqlen": -8}, {"n_samples": 2.5}])
def test_calibration_samples_reject_non_positive_sizes(tiny_tokenizer, settings):
    with pytest.raises(LorapError, match="must be a positive integer"):
        calibration_samples(tiny_tokenizer, "wiki", **{"n_samples": 4, "seqlen": 32, **settings})


# ---------------------------------------------------------------- local files


def test_local_txt_is_one_document_for_every_split(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("first line\n\nsecond paragraph\n", encoding="utf-8")
    assert load_documents(str(corpus), "train") == ["first line\n\nsecond paragraph\n"]
    assert load_documents(str(corpus), "test") == ["first line\n\nsecond paragraph\n"]


def test_local_jsonl_default_and_named_field(tmp_path):
    corpus = _write_jsonl(
        tmp_path / "records.jsonl",
        [{"text": "alpha", "body": "one"}, {"text": "beta", "body": "two"}, {"text": "gamma", "body": 3}],
    )
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write("\n   \n")  # blank lines are skipped
    assert load_documents(str(corpus), "test") == ["alpha", "beta", "gamma"]
    assert load_documents(f"{corpus}:body", "train") == ["one", "two", "3"]


def test_local_jsonl_errors(tmp_path):
    corpus = _write_jsonl(tmp_path / "records.jsonl", [{"text": "alpha"}, {"body": "no text here"}])
    with pytest.raises(LorapError, match=r"records\.jsonl:2: no field 'text'"):
        load_documents(str(corpus), "test")
    with pytest.raises(LorapError, match=r"records\.jsonl:1: no field 'title'"):
        load_documents(f"{corpus}:title", "test")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    with pytest.raises(LorapError, match=r"broken\.jsonl:2: not valid JSON"):
        load_documents(str(broken), "test")


def test_corpora_joined_by_plus_are_pooled_in_order(tiny_tokenizer, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("notes of another kind " * 400, encoding="utf-8")
    records = _write_jsonl(tmp_path / "records.jsonl", [{"text": "alpha", "body": "beta"}])
    assert load_documents(f"wiki+{notes}", "validation") == wiki_documents("validation") + [notes.read_text()]
    assert load_documents(f"{notes} + {records}:body", "test") == [notes.read_text(), "beta"]
    # calibration takes an equal share from each corpus, however small, each from its own windows
    pooled = calibration_samples(tiny_tokenizer, f"wiki+{notes}", n_samples=7, seqlen=16, seed=0)
    assert torch.equal(pooled, torch.cat([calibration_samples(tiny_tokenizer, "wiki", 4, 16, 0),
                                          calibration_samples(tiny_tokenizer, str(notes), 3, 16, 0)]))
    assert calibration_samples(tiny_tokenizer, f"wiki+{notes}", n_samples=1, seqlen=16).shape == (1, 16)
    one_file = tmp_path / "a+b.txt"  # a file whose name has a '+' is one corpus
    one_file.write_text("words", encoding="utf-8")
    assert load_documents(str(one_file), "train") == ["words"]
    one_jsonl = _write_jsonl(tmp_path / "c+d.jsonl", [{"body": "fields"}])
    assert load_documents(f"{one_jsonl}:body", "train") == ["fields"]
    for bad in (f"wiki+{notes}+wiki", "wiki+", f"+{notes}"):
        with pytest.raises(LorapError, match="name each pooled corpus once"):
            load_documents(bad, "train")
    with pytest.raises(LorapError, match="unknown corpus 'nope'"):
        load_documents("wiki+nope", "train")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.jsonl:body"])
def test_local_file_missing(tmp_path, name):
    with pytest.raises(LorapError, match="corpus file not found: .*missing"):
        load_documents(str(tmp_path / name), "test")


def test_local_corpus_token_stream(tiny_tokenizer, tmp_path):
    corpus = _write_jsonl(tmp_path / "two.jsonl", [{"text": "The first document."}, {"text": "The second one."}])
    stream = token_stream(tiny_tokenizer, str(corpus), "test")
    expected = tiny_tokenizer("The first document.\n\nThe second one.")["input_ids"]
    assert stream.tolist() == expected


# ---------------------------------------------------------------- hub corpora (local stand-ins)

# What the published evaluation protocol loads from the hub, written out independently of lorap.
HUB_EXPECTED = {
    # name: (path, config, {lorap split: dataset split}, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"train": "train", "validation": "validation", "test": "test"}, "text"),
    "ptb": ("ptb_text_only", "penn_treebank", {"train": "train", "test": "validation"}, "sentence"),
    "c4": ("allenai/c4", None, {"train": "train", "test": "validation"}, "text"),
    "bookcorpus": ("bookcorpus", None, {"train": "train"}, "text"),
}
C4_FILES = {
    "validation": "en/c4-validation.00000-of-00008.json.gz",
    "train": "en/c4-train.00000-of-01024.json.gz",
}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The hub is 'reachable' and datasets.load_dataset serves local JSONL files of the hub schema."""
    import datasets

    real_load_dataset = datasets.load_dataset
    calls = []
    files = {}
    for name, (_, _, _, field) in HUB_EXPECTED.items():
        records = [{field: f"{name} document {i}.", "extra": i} for i in range(3)]
        records.insert(1, {field: "", "extra": -1})  # empty lines (as in wikitext) are dropped
        files[name] = _write_jsonl(tmp_path / f"{name}.jsonl", records)
    by_path = {path: name for name, (path, *_rest) in HUB_EXPECTED.items()}

    def fake_load_dataset(path, name=None, *args, split=None, data_files=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files, "args": args})
        corpus = by_path[path]
        return real_load_dataset(
            "json", data_files=str(files[corpus]), split="train", cache_dir=str(tmp_path / "hf-cache")
        )

    monkeypatch.setattr("lorap.io.network.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_STREAM_CACHE", {})
    return calls


@pytest.mark.parametrize("split", ["train", "validation", "test"])
@pytest.mark.parametrize("name", sorted(HUB_EXPECTED))
def test_hub_corpora_request_the_protocol_datasets(fake_hub, name, split):
    path, config, splits, _ = HUB_EXPECTED[name]
    if split not in splits:
        with pytest.raises(LorapError, match=f"'{name}' has no {split} split"):
            load_documents(name, split)
        assert fake_hub == []  # refused before going to the hub
        return
    documents = load_documents(name, split)
    assert documents == [f"{name} document {i}." for i in range(3)]
    assert len(fake_hub) == 1
    call = fake_hub[0]
    assert (call["path"], call["name"], call["args"]) == (path, config, ())
    assert call["split"] == splits[split]
    if name == "c4":
        assert call["data_files"] == {splits[split]: C4_FILES[splits[split]]}
    else:
        assert call["data_files"] is None


def test_hub_corpus_feeds_the_token_stream(fake_hub, tiny_tokenizer):
    stream = token_stream(tiny_tokenizer, "ptb", "test")
    expected = tiny_tokenizer(DOCUMENT_SEPARATOR.join(f"ptb document {i}." for i in range(3)))["input_ids"]
    assert stream.tolist() == expected


def test_hub_loader_failure_is_a_lorap_error(monkeypatch):
    import datasets

    def failing(*args, **kwargs):
        raise ConnectionError("simulated outage")

    monkeypatch.setattr("lorap.io.network.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(LorapError, match=r"could not load corpus 'wikitext2' \(wikitext, test\): simulated outage"):
        load_documents("wikitext2", "test")


@pytest.mark.parametrize("name", sorted(HUB_EXPECTED))
def test_hub_corpus_unreachable_fails_fast(monkeypatch, name):
    import datasets

    def must_not_load(*args, **kwargs):
        raise AssertionError("load_dataset called although the hub is unreachable")

    monkeypatch.setattr("lorap.io.network.hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(datasets, "load_dataset", must_not_load)
    started = time.perf_counter()
    with pytest.raises(LorapError, match=f"corpus '{name}' comes from the Hugging Face hub, which cannot be reached"):
        load_documents(name, "train")
    assert time.perf_counter() - started < 1.0


def test_hub_corpus_offline_environment_fails_fast(monkeypatch):
    """The real reachability check, with HF_HUB_OFFLINE set, answers at once."""
    from lorap.io import network

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    network.hub_reachable.cache_clear()
    try:
        started = time.perf_counter()
        with pytest.raises(LorapError, match="cannot be reached"):
            load_documents("wikitext2", "test")
        assert time.perf_counter() - started < 1.0
    finally:
        network.hub_reachable.cache_clear()
