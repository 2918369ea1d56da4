"""The shared-context scorer of the proxy tasks gives lm-eval's numbers, request by request."""
import pytest
import torch

from conftest import build_tiny_model
from lorap.evaluate import zeroshot
from lorap.evaluate.proxy_tasks import CLOZE_TASK, ENDING_TASK, PROXY_TASKS
from lorap.evaluate.shared_context import ContinuationScorer, batches_of, group_by_context, pack

LIMIT = 12
LOGPROB_TOLERANCE = 1e-4


@torch.no_grad()
def _unbatched(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One request alone, as HFLM computes it: (context + continuation)[:-1] through the model,
    the continuation's log-probabilities read from the positions that predict it."""
    logits = model(input_ids=torch.tensor([(context + continuation)[:-1]])).logits[0, len(context) - 1 :]
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def _random_requests(seed: int = 1, contexts: int = 12) -> list[tuple[list[int], list[int]]]:
    """Contexts of 2..40 tokens (every third one the beginning of the one before, as a wiki_ending
    context begins a wiki_cloze one), each with 1..4 continuations of 1..5 tokens: every kind
    of padding and sharing."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    def ids(low, high):
        return torch.randint(1, 500, (draw(low, high),), generator=generator).tolist()

    pairs, context = [], []
    for number in range(contexts):
        context = context[: draw(2, len(context))] if number % 3 == 2 and len(context) > 2 else ids(2, 41)
        pairs += [(context, ids(1, 6)) for _ in range(draw(1, 5))]
    return pairs


def _assert_same_answers(got, expected):
    assert len(got) == len(expected)
    for (logprob, greedy), (want_logprob, want_greedy) in zip(got, expected):
        assert logprob == pytest.approx(want_logprob, abs=LOGPROB_TOLERANCE)
        assert greedy == want_greedy


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_scorer_equals_one_request_at_a_time(tiny_arch, attention):
    """Padding, shared contexts and the split between the two passes change no score, on every
    supported architecture and attention kernel, whatever the batch."""
    model = build_tiny_model(tiny_arch)
    model.config._attn_implementation = attention
    pairs = _random_requests()
    expected = [_unbatched(model, context, continuation) for context, continuation in pairs]
    for contexts_per_batch in (1, 3, 16):
        got = ContinuationScorer(model, pad_id=0).score(pairs, contexts_per_batch, progress=False)
        _assert_same_answers(got, expected)


def test_scorer_on_a_compressed_model(tiny_tokenizer):
    """Low-rank factor pairs in place of dense projections: still the same numbers."""
    from lorap.pipeline.config import CompressionConfig
    from lorap.pipeline.run import compress_model

    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer))
    compress_model(model, tiny_tokenizer, CompressionConfig(ratio=0.5, calibration_samples=8, calibration_seqlen=32,
                                                            batch_size=4), progress=False)
    pairs = _random_requests(seed=2)
    expected = [_unbatched(model, context, continuation) for context, continuation in pairs]
    _assert_same_answers(ContinuationScorer(model, pad_id=0).score(pairs, 4, progress=False), expected)


def test_each_context_is_run_once():
    pairs = [([1, 2, 3], [4]), ([5, 6], [7, 8]), ([1, 2, 3], [9, 9, 9]), ([5, 6], [1]), ([1, 2], [3])]
    groups = group_by_context(pairs)
    # [1, 2] begins [1, 2, 3]: one packed sequence serves both; the longest comes first.
    assert [g.tokens for g in groups] == [[1, 2, 3], [5, 6]]
    assert [[(row.number, row.context_length) for row in g.rows] for g in groups] == [[(4, 2), (0, 3), (2, 3)], [(1, 2), (3, 2)]]
    assert [len(batch) for batch in batches_of(groups, contexts_per_batch=1)] == [1, 1]


def test_a_segment_sees_only_its_own_context_and_itself():
    (group,) = group_by_context([([1, 2, 3], [4, 5]), ([1, 2], [6])])
    packed = pack(group)
    # context [1, 2], then [2] + [] for the request with context [1, 2], then [3, 4] for the other.
    assert packed.ids == [1, 2, 2, 3, 4] and packed.positions == [0, 1, 1, 2, 3] and packed.segment_starts == [2, 3]
    assert packed.allowed.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],  # context [1, 2]: sees token 1, and its own last context token
        [1, 1, 0, 1, 0],  # context [1, 2, 3]: sees tokens 1, 2 and its segment
        [1, 1, 0, 1, 1],
    ]


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    """A tiny LLaMA with room for whole proxy contexts under the tiny BPE (sdpa, as models load)."""
    model = build_tiny_model("llama_gqa", max_position_embeddings=2048)
    model.config._attn_implementation = "sdpa"
    return model, tiny_tokenizer


def _per_request(results) -> dict:
    """{(task, item, choice): (log-likelihood, greedy)} from lm-eval's logged samples."""
    return {
        (task, sample["doc_id"], choice): tuple(response[0])
        for task, samples in results["samples"].items()
        for sample in samples
        for choice, response in enumerate(sample["resps"])
    }


def _run(lm, limit=LIMIT):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=list(PROXY_TASKS), task_manager=zeroshot.task_manager(list(PROXY_TASKS)),
                                   num_fewshot=0, limit=limit, log_samples=True, bootstrap_iters=0)


def _hflm(model, tokenizer, **settings):
    """lm-eval's own scorer. The per-request reference turns off its one-token-continuation cache:
    in lm-eval 0.4.13 that cache gives the shorter of two requests with the same model input but
    continuations of different lengths the log-probabilities of the first positions of the
    longer one's (greedy flags stay right). See test_requests_with_the_same_input."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, **settings)


def _shared_lm(model, tokenizer, **settings):
    from lorap.evaluate.shared_context import SharedContextLM

    return SharedContextLM(pretrained=model, tokenizer=tokenizer, shared_tasks=PROXY_TASKS, **settings)


def test_proxy_scores_equal_lm_eval_hflm(tiny_lm):
    """Every request of both proxy tasks: the same log-likelihood and greedy flag as lm-eval's
    HFLM, so the same acc, acc_norm and every other metric."""
    model, tokenizer = tiny_lm
    reference = _run(_hflm(model, tokenizer, batch_size=4, logits_cache=False))
    shared = _run(_shared_lm(model, tokenizer, batch_size=4))
    expected, got = _per_request(reference), _per_request(shared)
    assert got.keys() == expected.keys() and len(got) == LIMIT * 5  # a cloze request and 4 endings per item
    _assert_same_answers([got[key] for key in expected], [expected[key] for key in expected])
    for task in PROXY_TASKS:
        assert shared["results"][task].keys() == reference["results"][task].keys()
        for metric, value in reference["results"][task].items():
            _assert_same_value(shared["results"][task][metric], value, metric)


def test_requests_with_the_same_input(tiny_lm):
    """A cloze item and an ending choice can be the same text split at different points (it
    happens once in the built-in proxies: cloze item 415, ending item 413). Each is scored at
    its own positions, as lm-eval scores them without its one-token-continuation cache."""
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny_lm
    requests = [Instance("loglikelihood", doc={}, arguments=arguments, idx=0, metadata=(task, 0, 1))
                for task, arguments in ((CLOZE_TASK, ("The river flows to the", " sea")),
                                        (ENDING_TASK, ("The river", " flows to the sea")))]
    expected = _hflm(model, tokenizer, batch_size=2, logits_cache=False).loglikelihood(requests, disable_tqdm=True)
    _assert_same_answers(_shared_lm(model, tokenizer, batch_size=2).loglikelihood(requests, disable_tqdm=True), expected)


def _assert_same_value(got, expected, name):
    """Numbers equal to rounding (a perplexity is exp of a mean log-likelihood); anything else exactly."""
    if isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-4), name
    else:
        assert got == expected, name


def test_report_rows_do_not_depend_on_the_scorer(tiny_lm):
    model, tokenizer = tiny_lm
    fast = zeroshot.evaluate_zeroshot(model, tokenizer, list(PROXY_TASKS), limit=LIMIT, batch_size=4)
    slow = zeroshot.evaluate_zeroshot(model, tokenizer, list(PROXY_TASKS), limit=LIMIT, batch_size=4, share_contexts=False)
    assert fast.keys() == slow.keys() == {CLOZE_TASK, ENDING_TASK}
    for task in PROXY_TASKS:
        assert fast[task].keys() == slow[task].keys()
        for key, value in slow[task].items():
            _assert_same_value(fast[task][key], value, key)


def test_other_tasks_stay_with_lm_eval(tiny_lm):
    """Requests of tasks not named shared are handed to HFLM untouched."""
    from lm_eval.api.instance import Instance

    from lorap.evaluate.shared_context import SharedContextLM

    model, tokenizer = tiny_lm
    lm = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=2, shared_tasks=[ENDING_TASK])
    requests = [
        Instance("loglikelihood", doc={}, arguments=("The river flows", " to the sea"), idx=0, metadata=(task, 0, 1))
        for task in (ENDING_TASK, "boolq")
    ] + [Instance("loglikelihood", doc={}, arguments=("", " alone"), idx=0, metadata=(ENDING_TASK, 1, 1))]
    mine, _ = lm._shared_requests(requests)
    assert mine == [0]  # not boolq, and not an empty context (HFLM puts a prefix token there)
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    assert answers[0][0] == pytest.approx(answers[1][0], abs=LOGPROB_TOLERANCE)
    assert answers[0][1] == answers[1][1]
