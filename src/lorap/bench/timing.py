"""The one timing code of lorap: prefill latency and decode throughput, for one model (`lorap eval
--speed`) or for several interleaved (`lorap bench`), so machine noise hits every model alike.

Timings are medians with their spread over repeats; on CUDA the device is synchronised around each
call, so wall time is what the GPU spent. Speedups are paired: the median, over rounds, of one
model's time over another's in the same round (`paired_ratio`). On a shared machine slow spells
last seconds; a ratio of two medians takes each from different moments, a paired ratio compares
measurements taken back to back. Decode goes further: the models generate in lockstep, one token
each in turn, so each pair of steps is milliseconds apart.
"""
import statistics
import time

import torch


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(seconds: list[float]) -> dict:
    """Median and spread of repeated timings, in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "iqr_ms": quartiles[2] - quartiles[0],
        "repeats": len(ms),
    }


def paired_ratio(numerators: list[float], denominators: list[float]) -> dict:
    """The median of numerators[i] / denominators[i] (times measured in the same round), with the
    quartiles of those ratios: how steady the speedup was, which the spread of each model's own
    times does not tell on a machine whose speed drifts."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"paired ratios need two equally long, non-empty lists ({len(numerators)}, {len(denominators)})")
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "low_quartile": quartiles[0], "high_quartile": quartiles[2],
            "pairs": len(ratios)}


def rate_spread(new_tokens: int, seconds: list[float]) -> dict:
    """Decode rates (tokens/s per sequence) of repeated runs."""
    rates = sorted(new_tokens / s for s in seconds)
    return {
        "median_tokens_per_s": statistics.median(rates),
        "min_tokens_per_s": rates[0],
        "max_tokens_per_s": rates[-1],
        "repeats": len(rates),
    }


def prompt_ids(vocab_size: int, length: int, device, batch: int = 1) -> torch.Tensor:
    # Fixed pseudo-random ids: timing must not depend on text, and a constant id could
    # hit special fast paths nowhere else seen.
    generator = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


def _device_of(model):
    return next(model.parameters()).device


def elapsed_seconds(device, work) -> float:
    """Seconds `work()` took: by CUDA events on a GPU (what the device spent), else by the clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@torch.no_grad()
def prefill_seconds(model, tokens: torch.Tensor) -> float:
    """One forward over `tokens` without a cache, logits at every position: a scoring pass. The first
    token of generate() costs less, which projects the last position only (logits_to_keep=1);
    benchmarks/plain_transformers_speed.py times both."""
    return elapsed_seconds(tokens.device, lambda: model(input_ids=tokens, use_cache=False))


class Generation:
    """One model's greedy generation with the KV cache, a token per `step()`."""

    def __init__(self, model, prompt: torch.Tensor):
        self.model = model
        with torch.no_grad():
            output = model(input_ids=prompt, use_cache=True)
        self.cache, self.token = output.past_key_values, output.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def _next(self) -> None:
        output = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True)
        self.cache, self.token = output.past_key_values, output.logits[:, -1:].argmax(-1)

    def step(self) -> float:
        """Generate one token; returns the seconds it took."""
        return elapsed_seconds(self.token.device, self._next)


class CompiledGeneration(Generation):
    """Greedy generation as serving engines decode: the KV cache preallocated (transformers' static
    cache, `cache`, emptied first) and every step run by `forward`, the model's forward compiled once
    (compiled_forward). On CUDA a compiled step replays as one CUDA graph, so the host launching
    kernels one by one no longer bounds decode."""

    def __init__(self, model, prompt: torch.Tensor, cache, forward):
        self.model, self.cache, self.forward = model, cache, forward
        cache.reset()
        length = prompt.shape[1]
        with torch.no_grad():  # the prompt runs eagerly, as generate() runs it
            output = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                           cache_position=torch.arange(length, device=prompt.device))
        self.token, self.position = output.logits[:, -1:].argmax(-1), length
        # One step untimed: the first compiled step after an eager pass costs more than the rest (on the
        # CPU several times more), as engines pay it with the prompt.
        self._next()

    @torch.no_grad()
    def _next(self) -> None:
        position = torch.full((1,), self.position, device=self.token.device)
        if position.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read: replay may reuse them
        output = self.forward(input_ids=self.token, past_key_values=self.cache, cache_position=position, use_cache=True)
        self.token = output.logits[:, -1:].argmax(-1)
        self.position += 1


def compiled_forward(model):
    """The model's forward compiled for decode steps of one shape: on CUDA, "reduce-overhead" (CUDA
    graphs); elsewhere torch.compile's default."""
    mode = "reduce-overhead" if _device_of(model).type == "cuda" else "default"
    return torch.compile(model.forward, mode=mode, dynamic=False)


def eager_generation(label, model, prompt: torch.Tensor) -> Generation:
    return Generation(model, prompt)


def lockstep_decode(models: dict, prompt: torch.Tensor, new_tokens: int, start=eager_generation) -> dict:
    """{label: [seconds of each new token]}: every model generates `new_tokens` after `prompt`, one
    token each in turn (the order reversed every other token), so a slow spell of a shared machine
    falls on both sides of each pair of steps. `start(label, model, prompt)` begins a model's generation
    (by default an eager one with the default cache)."""
    generations = {label: start(label, model, prompt) for label, model in models.items()}
    steps = {label: [] for label in models}
    labels = list(models)
    for number in range(new_tokens):
        for label in labels if number % 2 == 0 else reversed(labels):
            steps[label].append(generations[label].step())
    return steps


class LayerClock:
    """Seconds spent inside each decoder layer, by forward hooks.

    `forwards` holds one entry per forward of the model: (tokens it carried, seconds inside all of
    its layers), so the time compression can change is told apart from what it never touches
    (embeddings, LM head, generation's bookkeeping). `per_layer` holds each layer's own times.

    On a CPU the hooks read the clock. On CUDA they record events instead and never synchronise:
    a synchronisation per layer would stall the host between layers, and on a GPU whose decode
    is bound by how fast the host launches kernels that would time the hooks, not the layers.
    The events are read when a result is asked for.
    """

    def __init__(self, layers, device):
        self.device, self.layers = device, list(layers)
        self._on_gpu = device.type == "cuda"
        self._started, self._handles = {}, []
        self.clear()  # the recorded times: _forwards, _per_layer, _pending
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._start(index), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._stop(index)))

    def _now(self):
        if self._on_gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, index):
        def hook(module, args, kwargs):
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._forwards.append([hidden.shape[-2], 0.0])
            self._started[index] = self._now()
        return hook

    def _stop(self, index):
        def hook(module, args, output):
            # (which forward, which layer, start, stop): resolved into seconds by _settle
            self._pending.append((len(self._forwards) - 1, index, self._started[index], self._now()))
        return hook

    def _settle(self) -> None:
        """Turn the recorded starts and stops into seconds (on CUDA, after the events completed)."""
        if not self._pending:
            return
        if self._on_gpu:
            self._pending[-1][3].synchronize()
        for forward, index, start, stop in self._pending:
            seconds = start.elapsed_time(stop) / 1000 if self._on_gpu else stop - start
            self._per_layer[index].append(seconds)
            self._forwards[forward][1] += seconds
        self._pending = []

    @property
    def forwards(self) -> list:
        self._settle()
        return self._forwards

    @property
    def per_layer(self) -> list:
        self._settle()
        return self._per_layer

    def clear(self) -> None:
        self._forwards, self._per_layer, self._pending = [], [[] for _ in self.layers], []

    def seconds(self, tokens: int, skip: int = 0) -> list[float]:
        """Seconds inside the layers of each forward that carried `tokens` tokens, in order, after
        the first `skip` of them (warm-up runs)."""
        return [s for n, s in self.forwards if n == tokens][skip:]

    def median_ms(self, tokens: int, skip: int = 0) -> float | None:
        """Median milliseconds inside the layers of the forwards that carried `tokens` tokens."""
        seconds = self.seconds(tokens, skip)
        return statistics.median(seconds) * 1000 if seconds else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def interleaved(models: dict, call, warmup: int, repeats: int) -> dict:
    """{label: [seconds per repeat]}: `call(model)` timed for every model in turn, the order
    reversed every other round, so slow spells of a shared machine fall on all models alike."""
    labels = list(models)
    for _ in range(warmup):
        for label in labels:
            call(models[label])
    times = {label: [] for label in labels}
    for round_number in range(repeats):
        for label in labels if round_number % 2 == 0 else reversed(labels):
            times[label].append(call(models[label]))
    return times


def prefill_latencies(models: dict, seqlen: int, batch: int = 1, warmup: int = 1, repeats: int = 5) -> dict:
    """{label: spread of the prefill time of `batch` x `seqlen` tokens, and `rounds_ms`, the time of
    each round in order (for paired ratios)}, timed interleaved."""
    first = next(iter(models.values()))
    tokens = prompt_ids(first.config.vocab_size, seqlen, _device_of(first), batch)
    times = interleaved(models, lambda model: prefill_seconds(model, tokens), warmup, repeats)
    results = {}
    for label, seconds in times.items():
        result = spread(seconds)
        result["tokens_per_s"] = batch * seqlen / (result["median_ms"] / 1000)
        result["rounds_ms"] = [s * 1000 for s in seconds]
        results[label] = result
    return results


def decode_throughputs(models: dict, prompt_len: int = 128, new_tokens: int = 128, warmup: int = 1,
                       repeats: int = 3, batch: int = 1, compiled: bool = False) -> dict:
    """{label: tokens/s generated one at a time with the KV cache after a `prompt_len` prefill, and
    `steps_ms`, every timed token's milliseconds in order (for paired ratios)}: the models generate
    in lockstep (lockstep_decode), `repeats` times; a rate's spread is over the repeats. `compiled`:
    as engines decode (CompiledGeneration); the warm-up, at least 8 tokens, compiles and records."""
    first = next(iter(models.values()))
    prompt = prompt_ids(first.config.vocab_size, prompt_len, _device_of(first), batch)
    start = eager_generation
    if compiled:
        from transformers import StaticCache

        caches = {label: StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
                  for label, model in models.items()}
        forwards = {label: compiled_forward(model) for label, model in models.items()}

        def start(label, model, prompt):
            return CompiledGeneration(model, prompt, caches[label], forwards[label])
    for _ in range(warmup):
        lockstep_decode(models, prompt, min(new_tokens, 8), start)
    runs = [lockstep_decode(models, prompt, new_tokens, start) for _ in range(repeats)]
    return {label: {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "batch": batch,
                    **rate_spread(new_tokens, [sum(run[label]) for run in runs]),
                    "steps_ms": [s * 1000 for run in runs for s in run[label]]} for label in models}


def prefill_latency(model, seqlen: int, warmup: int = 2, repeats: int = 5) -> dict:
    """Batch-1 prefill of one model (the same code as the interleaved one, with one model)."""
    result = prefill_latencies({"model": model}, seqlen, 1, warmup, repeats)["model"]
    result.pop("rounds_ms")
    return result


def decode_throughput(model, prompt_len: int = 128, new_tokens: int = 64, warmup: int = 1, repeats: int = 3) -> dict:
    """Decode rate of one model (the same code as the interleaved one, with one model)."""
    result = decode_throughputs({"model": model}, prompt_len, new_tokens, warmup, repeats)["model"]
    result.pop("batch")
    result.pop("steps_ms")
    return result
