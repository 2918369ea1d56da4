"""lm-eval's log-likelihoods for lorap's proxy tasks, with every context run through the model once.

lm-eval's HFLM scores each (context, continuation) request on its own: a multiple-choice item
with four endings runs its context four times, and the vocabulary projection and softmax are
computed at every context position although only the continuation's are read. On a CPU that
repetition is most of the time of the proxy tasks (docs/records/speed.md, section `eval-speed`, times the
default `lorap eval` with both scorers). `SharedContextLM` answers the same requests thus:

  * requests are grouped by context, and a context that is the beginning of a longer one
    joins that one's group (440 of the 500 wiki_ending contexts begin a wiki_cloze context);
  * each group becomes one packed sequence: its longest context without the last token, then
    for each request a segment [last token of its context] + continuation[:-1] at that
    request's own positions. An attention mask lets a segment see only its own context and
    itself, so each segment's outputs are exactly the logits that predict its continuation,
    as if the request had been run alone;
  * packed sequences of similar length are left-padded into one forward pass, and the
    vocabulary projection is computed only for the segments at the end of each row.

It computes what HFLM computes: the same token ids (lm-eval's own `_encode_pair`), the same
positions, the sum of the continuation's log-softmax values, and "greedy" when every
continuation token is the argmax. Floating point differs only in the order of operations;
the tests check every request against HFLM. One difference is deliberate: HFLM's
one-token-continuation cache (lm-eval 0.4.13) gives the shorter of two requests with the same
model input but continuations of different lengths the log-probabilities of the longer one's
first positions. This class scores each request on its own, as HFLM(logits_cache=False) does;
in the proxies that changes only the cloze's secondary `perplexity` metric, never acc or
acc_norm (docs/evaluation.md, "The offline proxy tasks", has the case and its figures).
Requests it was not asked to take (the standard hub tasks) and those it does not
handle (an empty or one-token context, longer than the model's window, an attention kernel
without custom masks) go to HFLM.
"""
import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

DEFAULT_CONTEXTS_PER_BATCH = 8
# Attention kernels that take an arbitrary (4D, additive) attention mask from transformers.
MASKABLE_ATTENTION = ("eager", "sdpa")


@dataclass
class Row:
    """One request: its continuation, after the first `context_length` tokens of its group."""

    number: int  # where the answer goes in the caller's list
    context_length: int
    continuation: list[int]


@dataclass
class ContextGroup:
    """Requests whose contexts are all beginnings of `tokens` (the longest of them)."""

    tokens: list[int]
    rows: list[Row] = field(default_factory=list)

    def packed_length(self) -> int:
        return len(self.tokens) - 1 + sum(len(row.continuation) for row in self.rows)


def group_by_context(pairs: list[tuple[list[int], list[int]]]) -> list[ContextGroup]:
    """Groups of requests that share one context pass, longest first (so a batch needs little
    padding, and the largest comes first: a memory limit is met at once, not at the end).

    In sorted order, a context that begins others comes just before them, so each distinct
    context only needs comparing with the next one; it joins that one's group."""
    continuations: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
    for number, (context, continuation) in enumerate(pairs):
        continuations[tuple(context)].append((number, list(continuation)))
    distinct = sorted(continuations)
    longest_of: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i in reversed(range(len(distinct))):
        context = distinct[i]
        begins_next = i + 1 < len(distinct) and distinct[i + 1][: len(context)] == context
        longest_of[context] = longest_of[distinct[i + 1]] if begins_next else context
    groups: dict[tuple[int, ...], ContextGroup] = {}
    for context in distinct:
        group = groups.setdefault(longest_of[context], ContextGroup(list(longest_of[context])))
        group.rows += [Row(number, len(context), continuation) for number, continuation in continuations[context]]
    return sorted(groups.values(), key=lambda g: -g.packed_length())


def batches_of(groups: list[ContextGroup], contexts_per_batch: int) -> list[list[ContextGroup]]:
    return [groups[i : i + contexts_per_batch] for i in range(0, len(groups), contexts_per_batch)]


@dataclass
class PackedSequence:
    """A group as one sequence: ids, their positions, who may attend to whom, and where each
    request's segment starts."""

    ids: list[int]
    positions: list[int]
    allowed: torch.Tensor  # [length, length] bool: query (row) may attend to key (column)
    segment_starts: list[int]


def pack(group: ContextGroup) -> PackedSequence:
    """The group's longest context but its last token, then one segment per request:
    [its context's last token] + continuation[:-1], at the positions the request has alone."""
    context = group.tokens[:-1]
    ids, positions = list(context), list(range(len(context)))
    segment = [-1] * len(context)  # which request a token belongs to; -1: the shared context
    visible_context = [p + 1 for p in positions]  # context tokens each token may see (causal)
    starts = []
    for number, row in enumerate(group.rows):
        starts.append(len(ids))
        first = row.context_length - 1  # the position of the request's last context token
        ids += [group.tokens[first]] + row.continuation[:-1]
        positions += range(first, first + len(row.continuation))
        segment += [number] * len(row.continuation)
        visible_context += [first] * len(row.continuation)  # its own context, not the rest of the group's
    segment_of = torch.tensor(segment)
    index = torch.arange(len(ids))
    sees_context = (index[None, :] < len(context)) & (index[None, :] < torch.tensor(visible_context)[:, None])
    same_segment = (segment_of[:, None] == segment_of[None, :]) & (segment_of[:, None] >= 0)
    causal = index[None, :] <= index[:, None]
    return PackedSequence(ids, positions, sees_context | (same_segment & causal), starts)


def left_padded(sequences: list[PackedSequence], pad_id: int, mask_dtype) -> dict:
    """Model inputs for sequences padded on the left, so every row's segments end at the last
    column. The additive mask (0 or the dtype's minimum) is what eager and SDPA attention
    both take; a pad attends only to itself, so no row of it is fully masked (NaN)."""
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(sequences), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(sequences), 1, 1)
    for b, sequence in enumerate(sequences):
        offset = width - len(sequence.ids)
        ids[b, offset:] = torch.tensor(sequence.ids)
        positions[b, offset:] = torch.tensor(sequence.positions)
        allowed[b, offset:, offset:] = sequence.allowed
    mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill(~allowed, torch.finfo(mask_dtype).min)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask[:, None]}


class ContinuationScorer:
    """Scores (context, continuation) token pairs on a causal LM, each shared context once."""

    def __init__(self, model, pad_id: int, softmax_dtype=None, autocast_dtype=None):
        self.model = model
        self.pad_id = pad_id
        self.softmax_dtype = softmax_dtype
        self.autocast_dtype = autocast_dtype
        self.device = model.get_input_embeddings().weight.device  # also right when spread over devices
        # Most causal LMs can skip the vocabulary projection where no logits are wanted.
        self.can_skip_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def score(self, pairs: list[tuple[list[int], list[int]]], contexts_per_batch: int,
              progress: bool = True) -> list[tuple[float, bool]]:
        """(sum of continuation log-probabilities, whether greedy decoding gives it) per pair, in order."""
        answers: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="scoring continuations (shared contexts)", disable=not progress)
        for batch in batches_of(group_by_context(pairs), contexts_per_batch):
            for number, answer in self._score_batch(batch):
                answers[number] = answer
            bar.update(sum(len(group.rows) for group in batch))
        bar.close()
        return answers

    @torch.no_grad()
    def _score_batch(self, batch: list[ContextGroup]) -> list[tuple[int, tuple[float, bool]]]:
        sequences = [pack(group) for group in batch]
        inputs = left_padded(sequences, self.pad_id, self.model.dtype)
        width = inputs["input_ids"].shape[1]
        # Only the segments (at the end of every row) need the vocabulary projection.
        kept = max(len(s.ids) - s.segment_starts[0] for s in sequences) if self.can_skip_logits else width
        extra = {"logits_to_keep": kept} if self.can_skip_logits else {}
        logits = self._forward(**{k: v.to(self.device) for k, v in inputs.items()}, use_cache=False, **extra).logits
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        answers = []
        for b, (group, sequence) in enumerate(zip(batch, sequences)):
            first_kept = len(sequence.ids) - kept  # the index in `sequence` of logits column 0 (rows end together)
            for row, start in zip(group.rows, sequence.segment_starts):
                begin = start - first_kept
                answers.append((row.number, _answer(logprobs[b, begin : begin + len(row.continuation)], row.continuation)))
        return answers

    def _forward(self, **inputs):
        # The same autocast setting as HFLM._model_call, so both compute in the same precision.
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            return self.model(**inputs)


def _answer(logprobs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """As HFLM: the sum of the chosen tokens' log-probabilities; greedy iff each is the argmax."""
    target = torch.tensor(continuation, device=logprobs.device)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return float(logprobs.gather(1, target[:, None]).sum()), greedy


class SharedContextLM(HFLM):
    """HFLM whose log-likelihood requests of `shared_tasks` are scored by ContinuationScorer.

    Only lorap's proxy tasks are routed here by default: the standard tasks stay on lm-eval's
    own scoring, so their numbers never depend on lorap's code."""

    def __init__(self, *args, shared_tasks=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.shared_tasks = frozenset(shared_tasks)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        mine, pairs = self._shared_requests(requests)
        if not mine:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        answers: list = [None] * len(requests)
        taken = set(mine)
        others = [i for i in range(len(requests)) if i not in taken]
        if others:
            for i, answer in zip(others, super().loglikelihood([requests[i] for i in others], disable_tqdm=disable_tqdm)):
                answers[i] = answer
        scorer = ContinuationScorer(self.model, self._pad_id(), self.softmax_dtype, self.mixed_precision_dtype)
        for i, answer in zip(mine, scorer.score(pairs, self._contexts_per_batch(), progress=not disable_tqdm)):
            answers[i] = answer
            self.cache_hook.add_partial("loglikelihood", requests[i].args, answer)
        return answers

    def _shared_requests(self, requests) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
        """(positions, lm-eval's tokens) of the requests this class scores itself: those of a shared
        task whose context is not empty (HFLM puts a prefix token in place of an empty one), has
        at least two tokens (the packed sequence holds all but the last) and fits in the window
        (HFLM would cut it from the left), on a causal LM whose attention takes a custom mask."""
        attention = getattr(self.model.config, "_attn_implementation", None)
        if self.backend != "causal" or attention not in MASKABLE_ATTENTION:
            return [], []
        positions, pairs = [], []
        for i, request in enumerate(requests):
            context, continuation = request.args[:2]
            if request.task_name not in self.shared_tasks or not context:
                continue
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            if len(context_ids) >= 2 and len(context_ids) + len(continuation_ids) <= self._window():
                positions.append(i)
                pairs.append((context_ids, continuation_ids))
        return positions, pairs

    def _window(self) -> int:
        """The longest request scored here. A custom mask replaces the sliding-window mask, so a
        request must fit inside the window for the two to agree."""
        window = getattr(self.model.config, "sliding_window", None)
        return min(self.max_length, window) if isinstance(window, int) and window > 0 else self.max_length

    def _contexts_per_batch(self) -> int:
        size = self.batch_size
        return size if isinstance(size, int) and size > 0 else DEFAULT_CONTEXTS_PER_BATCH

    def _pad_id(self) -> int:
        for token in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return token
        return 0  # any id will do: padded positions are masked out and never read
