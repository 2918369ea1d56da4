"""Zero-shot: the offline proxy tasks and lorap's lm-eval wrapper, on tiny models."""
import json

import pytest
import torch

from conftest import build_tiny_model
from lorap.errors import LorapError
from lorap.evaluate import proxy_tasks, zeroshot
from lorap.evaluate.proxy_tasks import CLOZE_TASK, ENDING_TASK, PROXY_TASKS

LIMIT = 12


def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_proxy_tasks_are_byte_identical_across_builds(tmp_path):
    first = proxy_tasks.build_proxy_tasks(tmp_path / "a")
    proxy_tasks.build_proxy_tasks(tmp_path / "b", final_folder=tmp_path / "a")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert sorted(_files(tmp_path / "a")) == sorted(f"{t}.{ext}" for t in PROXY_TASKS for ext in ("jsonl", "yaml"))
    # The YAML points lm-eval at the data by absolute path.
    assert str((tmp_path / "a" / f"{CLOZE_TASK}.jsonl").resolve()) in (tmp_path / "b" / f"{CLOZE_TASK}.yaml").read_text()
    assert first[CLOZE_TASK]["items"] == first[ENDING_TASK]["items"] == proxy_tasks.MAX_ITEMS


def _records(folder, task):
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def test_proxy_items_are_well_formed(tmp_path):
    from lorap.io.data import wiki_documents

    proxy_tasks.build_proxy_tasks(tmp_path)
    documents = wiki_documents("test")
    for item in _records(tmp_path, CLOZE_TASK):
        number = int(item["id"].rsplit("-", 1)[1])
        assert item["target"].startswith(" ") and item["target"][1:].replace("-", "").replace("'", "").isalpha()
        # Context + target is the paragraph minus at most its final punctuation.
        assert (item["context"] + item["target"]) in documents[number]
    endings = _records(tmp_path, ENDING_TASK)
    labels = [item["label"] for item in endings]
    for item in endings:
        number = int(item["id"].rsplit("-", 1)[1])
        assert len(set(item["choices"])) == 4
        paragraph = documents[number].split("\n")[0].strip()
        true_ending = item["choices"][item["label"]]
        assert paragraph.endswith(true_ending) and paragraph[: -len(true_ending)].rstrip().endswith(item["context"])
        assert all(choice not in documents[number] for i, choice in enumerate(item["choices"]) if i != item["label"])
    # The true ending is not always in the same place (a position bias would be a free win).
    assert all(labels.count(position) > len(labels) / 8 for position in range(4))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny_tokenizer):
    """A tiny LLaMA with room for whole proxy contexts under the tiny BPE, saved with its tokenizer."""
    model = build_tiny_model("llama_gqa", max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return model, tiny_tokenizer, folder


@pytest.fixture(scope="module")
def wrapper_table(tiny_lm):
    model, tokenizer, _ = tiny_lm
    return zeroshot.evaluate_zeroshot(model, tokenizer, list(PROXY_TASKS), limit=LIMIT, batch_size=4)


def test_wrapper_accuracy_equals_lm_eval_own_run(tiny_lm, wrapper_table):
    """lm-eval loading the saved model by itself (its own HF path) gives the same accuracies."""
    import lm_eval

    _, _, folder = tiny_lm
    own = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32", "device": "cpu"},
        tasks=list(PROXY_TASKS),
        task_manager=zeroshot.task_manager(list(PROXY_TASKS)),
        num_fewshot=0,
        limit=LIMIT,
        batch_size=4,
        bootstrap_iters=0,
    )["results"]
    for task in PROXY_TASKS:
        assert wrapper_table[task]["n"] == LIMIT
        assert wrapper_table[task]["proxy"] is True
        assert wrapper_table[task]["acc"] == pytest.approx(own[task]["acc,none"], abs=1e-12)
    assert wrapper_table[ENDING_TASK]["acc_norm"] == pytest.approx(own[ENDING_TASK]["acc_norm,none"], abs=1e-12)
    assert wrapper_table[CLOZE_TASK]["acc_norm"] is None  # a cloze has no normalised variant


@torch.no_grad()
def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether greedy decoding reproduces it.

    Encoded as lm-eval documents it: the whole text once, the context part cut off by length.
    """
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    target = whole[len(context_ids):]
    logits = model(input_ids=torch.tensor([whole])).logits[0, len(context_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1)
    chosen = logprobs[torch.arange(len(target)), torch.tensor(target)]
    return float(chosen.sum()), bool((logprobs.argmax(-1) == torch.tensor(target)).all())


def test_wrapper_accuracy_equals_independent_recount(tiny_lm, wrapper_table):
    """Accuracy recomputed from the model's own log-likelihoods, without lm-eval."""
    model, tokenizer, _ = tiny_lm
    folder = proxy_tasks.proxy_task_folder()
    cloze = _records(folder, CLOZE_TASK)[:LIMIT]
    greedy = [_continuation_logprob(model, tokenizer, item["context"], item["target"])[1] for item in cloze]
    assert wrapper_table[CLOZE_TASK]["acc"] == pytest.approx(sum(greedy) / LIMIT)

    correct = correct_norm = 0
    for item in _records(folder, ENDING_TASK)[:LIMIT]:
        scores = [_continuation_logprob(model, tokenizer, item["context"], " " + c)[0] for c in item["choices"]]
        normed = [s / len(c) for s, c in zip(scores, item["choices"])]
        correct += max(range(4), key=scores.__getitem__) == item["label"]
        correct_norm += max(range(4), key=normed.__getitem__) == item["label"]
    assert wrapper_table[ENDING_TASK]["acc"] == pytest.approx(correct / LIMIT)
    assert wrapper_table[ENDING_TASK]["acc_norm"] == pytest.approx(correct_norm / LIMIT)


def test_report_rows_record_their_data(wrapper_table):
    row = wrapper_table[ENDING_TASK]
    assert row["published_metric"] == "acc_norm" and "proxy" in row["description"]
    assert row["data"]["sha256"] == proxy_tasks.file_sha256(row["data"]["file"])
    assert row["n_available"] == proxy_tasks.MAX_ITEMS and row["limit"] == LIMIT
    assert 0 <= zeroshot.average(wrapper_table) <= 1


def test_offline_flag_runs_the_proxies_and_says_so(monkeypatch):
    tasks, note, replace_missing = zeroshot.choose_tasks(None, offline=True)
    assert tasks == list(PROXY_TASKS) and not replace_missing
    assert "proxy" in note and "--offline" in note
    tasks, note, _ = zeroshot.choose_tasks(["standard", "wiki_cloze", "boolq"], offline=True)
    assert tasks == [*zeroshot.STANDARD_TASKS, CLOZE_TASK] and note is None


def test_without_network_the_proxies_replace_what_cannot_be_had(monkeypatch):
    """No hub and no cached copies: quickly, every standard task is named as missing."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lorap.io.network import hub_reachable

    hub_reachable.cache_clear()
    tasks, note, replace_missing = zeroshot.choose_tasks(None)
    assert tasks == list(zeroshot.STANDARD_TASKS) and replace_missing and note is None
    started = time.perf_counter()
    _, chosen, note = zeroshot.prepare(["boolq", "piqa"], replace_missing=True)
    assert chosen == list(PROXY_TASKS)
    assert "no data for boolq, piqa" in note and "cannot be reached" in note
    assert time.perf_counter() - started < 120  # no network retries


def test_unknown_task_is_a_plain_error():
    manager = zeroshot.task_manager(list(PROXY_TASKS))  # proxies only: no scan of lm-eval's tasks
    with pytest.raises(LorapError, match="unknown zero-shot task"):
        zeroshot.load_tasks(["no_such_task"], manager)


@pytest.mark.slow
def test_real_model_solves_the_ending_proxy_well_above_chance(default_model_dir):
    """A proxy that a real 135M model cannot beat chance on would measure nothing."""
    from lorap.io.models import load_model

    model, tokenizer, _ = load_model(str(default_model_dir))
    table = zeroshot.evaluate_zeroshot(model, tokenizer, [ENDING_TASK], limit=8)
    assert table[ENDING_TASK]["acc_norm"] >= 0.6  # chance is 0.25; measured 0.93 on 100 items
