"""Time checkpoints as a user without lorap would run them: plain transformers, nothing of lorap.

    python benchmarks/plain_transformers_speed.py DENSE_DIR LORAP_DIR [LORAP_DIR ...] --json OUT

Every model is loaded with `AutoModelForCausalLM.from_pretrained` (lorap checkpoints through their
own modeling file, `trust_remote_code=True`, then `model.optimize_for_inference()`, the one call
the README tells users to make for inference, or `fuse_factor_pairs()` in checkpoints written
before it); `lorap` itself cannot be imported here. The models are timed interleaved (round-robin,
the order reversed every other round): prefill of 1 x N tokens without a cache (logits at every
position, as a scoring pass computes them); the first token after N, as `generate()` computes it
(filling the KV cache, logits at the last position only: `logits_to_keep=1`); and decode of 128
greedy tokens with the KV cache after a 128-token prompt, the models generating in lockstep (one
token each in turn). One more lockstep decode, untimed, splits a token's time by forward hooks
into the attention blocks, the FFN blocks, the LM head and the rest. Reports medians with min and max, and the
speedup of each compressed model over the dense one, paired: the median over rounds (decode: over
tokens) of the dense time over the compressed time measured back to back, with its quartiles.
(lorap's own timing code, bench/timing.py, does the same; this harness may not import it.)
"""
import argparse
import functools
import json
import statistics
import sys
import time

sys.modules["lorap"] = None  # this harness must prove the checkpoints need nothing of lorap

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from common import load_average  # noqa: E402


def load(folder: str):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    if hasattr(model, "optimize_for_inference"):
        model.optimize_for_inference()
    elif hasattr(model, "fuse_factor_pairs"):
        model.fuse_factor_pairs()
    return model


def ids(vocab: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(length))


@torch.no_grad()
def prefill(model, tokens) -> float:
    begin = time.perf_counter()
    model(input_ids=tokens, use_cache=False)
    return time.perf_counter() - begin


@torch.no_grad()
def first_token(model, tokens) -> float:
    """The prompt's pass as generate() runs it: the cache filled, the vocabulary projected at the last
    position only (the LM head over every position is most of the difference from `prefill`)."""
    begin = time.perf_counter()
    model(input_ids=tokens, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    return time.perf_counter() - begin


@torch.no_grad()
def lockstep_decode(models: dict, prompt, new_tokens: int) -> dict:
    """{label: [seconds of each new token]}, the models taking turns a token at a time."""
    state = {}
    for label, model in models.items():
        out = model(input_ids=prompt, use_cache=True)
        state[label] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
    steps = {label: [] for label in models}
    labels = list(models)
    for number in range(new_tokens):
        for label in labels if number % 2 == 0 else reversed(labels):
            cache, token = state[label]
            begin = time.perf_counter()
            out = models[label](input_ids=token, past_key_values=cache, use_cache=True)
            state[label] = (out.past_key_values, out.logits[:, -1:].argmax(-1))
            steps[label].append(time.perf_counter() - begin)
    return steps


PARTS = ("attention", "FFN", "LM head")


def parts_of(model) -> dict:
    """{part: its modules} of a LLaMA-family causal LM: every layer's attention block, every layer's FFN
    block, the vocabulary projection."""
    layers = model.model.layers
    return {"attention": [layer.self_attn for layer in layers], "FFN": [layer.mlp for layer in layers],
            "LM head": [model.lm_head]}


def decode_shares(models: dict, prompt, new_tokens: int) -> dict:
    """{label: {part: ms per decode token}, with "total" and "rest"} from one more lockstep decode with
    forward hooks on the parts (on the CPU a module's wall time is its compute). Kept out of the timed
    runs, so the hooks cost those nothing. `rest` is everything else: embeddings, norms, residual adds,
    the layer loop, picking the token."""
    spent = {label: dict.fromkeys(PARTS, 0.0) for label in models}
    started = {}

    def start(module, args):
        started[module] = time.perf_counter()

    def stop(label, part, module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        if first.shape[1] == 1:  # a decode step's token; the prompt's pass is not counted
            spent[label][part] += time.perf_counter() - started[module]

    handles = []
    for label, model in models.items():
        for part, modules in parts_of(model).items():
            for module in modules:
                handles += [module.register_forward_pre_hook(start),
                            module.register_forward_hook(functools.partial(stop, label, part))]
    try:
        steps = lockstep_decode(models, prompt, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    shares = {}
    for label in models:
        total = sum(steps[label]) * 1000 / new_tokens
        parts = {part: seconds * 1000 / new_tokens for part, seconds in spent[label].items()}
        shares[label] = {**parts, "rest": total - sum(parts.values()), "total": total}
    return shares


def part_parameters(model) -> dict:
    return {part: sum(p.numel() for module in modules for p in module.parameters())
            for part, modules in parts_of(model).items()}


def interleaved(models: dict, call, repeats: int) -> dict:
    labels = list(models)
    for label in labels:
        call(models[label])  # warm-up
    times = {label: [] for label in labels}
    for round_number in range(repeats):
        for label in labels if round_number % 2 == 0 else reversed(labels):
            times[label].append(call(models[label]))
    return times


def summary(values: list) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def paired(dense: list, mine: list) -> dict:
    ratios = sorted(d / m for d, m in zip(dense, mine))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "low_quartile": quartiles[0], "high_quartile": quartiles[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense")
    parser.add_argument("compressed", nargs="+")
    parser.add_argument("--prefill", default="128,512")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"dense": load(args.dense), **{folder: load(folder) for folder in args.compressed}}
    vocab = models["dense"].config.vocab_size
    passes = {"prefill": prefill, "first_token": first_token}
    report = {"threads": torch.get_num_threads(), "load_before": load_average(), **{kind: {} for kind in passes},
              "decode": {}, "speedup": {label: {kind: {} for kind in passes} for label in args.compressed}}
    for length in map(int, args.prefill.split(",")):
        tokens = ids(vocab, length)
        for kind, timed_pass in passes.items():
            times = interleaved(models, lambda model: timed_pass(model, tokens), args.repeats)
            report[kind][length] = {label: summary([t * 1000 for t in values]) for label, values in times.items()}
            for label in args.compressed:
                report["speedup"][label][kind][length] = paired(times["dense"], times[label])
    prompt = ids(vocab, 128)
    lockstep_decode(models, prompt, 8)  # warm-up
    runs = [lockstep_decode(models, prompt, args.new_tokens) for _ in range(args.repeats)]
    report["decode"] = {label: summary([args.new_tokens / sum(run[label]) for run in runs]) for label in models}
    for label in args.compressed:
        report["speedup"][label]["decode"] = paired([t for run in runs for t in run["dense"]],
                                                    [t for run in runs for t in run[label]])
    report["decode_shares"] = decode_shares(models, prompt, args.new_tokens)
    report["part_parameters"] = {label: part_parameters(model) for label, model in models.items()}
    report["new_tokens"] = args.new_tokens
    report["load_after"] = load_average()
    report["parameters"] = {label: sum(p.numel() for p in model.parameters()) for label, model in models.items()}
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
