"""The public Python surface: compress(), plan(), load(), evaluate(), perplexity(). Thin calls
into the packages that do the work (docs/architecture.md has the map)."""


def perplexity(model, tokenizer, dataset="wiki", seqlen=128, max_tokens=None, split="test") -> float:
    from .evaluate.perplexity import perplexity as measure

    return measure(model, tokenizer, dataset, seqlen, max_tokens, split)


def evaluate(model=None, ppl=("wiki",), seqlens=(128,), max_tokens=None, device=None, **options) -> dict:
    """The report `lorap eval --json` writes, for a model given by name or path.

    `options` are named as `lorap eval`'s: against, alone, tasks (None: perplexity only), limit,
    offline, speed, speed_settings, batch_size, device_map, split ("validation" to choose
    settings). lorap.evaluate.suite.EvalRequest.from_keywords sorts them into the request.
    """
    from .evaluate.suite import EvalRequest, evaluate_suite

    request = EvalRequest.from_keywords(model, ppl=ppl, seqlens=seqlens, max_tokens=max_tokens, device=device, **options)
    return evaluate_suite(request)


def plan(model=None, preset="paper", predict_speed=True, **settings) -> dict:
    """What `lorap plan --json` prints, from shapes alone (a config.json, a folder or a hub id): the
    plan's per-module ranks and widths with their totals, the peak memory a run will need and, with
    `predict_speed`, the speedup a micro-benchmark of the plan's layers predicts. No weights load.

    `settings` are CompressionConfig fields and part options over those of the named preset
    (methods/presets.py). With adaptive FFN allocation the real per-layer widths depend on
    calibration data; the plan shows the uniform widths, whose total the adaptive run keeps (its
    `note` says so).
    """
    from .io.models import load_config
    from .methods.presets import config_for
    from .plan.report import plan_report

    config = config_for(preset, **settings)
    config.validate()
    if preset == "slicegpt":  # no per-module plan: say what the slicing keeps, from shapes
        from .errors import LorapError
        from .methods.slicegpt import choose_kept_dim, describe_share

        model_config = load_config(model)
        raise LorapError(f"{describe_share(model_config, choose_kept_dim(model_config, config.ratio))}. `lorap plan` "
                         "tabulates the layer-walk methods; SliceGPT's one choice is that stream width")
    return plan_report(load_config(model), config, predict_speed)


def compress(model=None, out=None, config=None, evaluate_ppl=(), eval_seqlens=(128,), eval_max_tokens=None,
             overwrite=False, progress=True, stream=None, resume=False, activation_dtype="auto",
             activation_store="memory", predict_speed=True, **settings):
    """Compress a model by LoRAP, save it to `out` (if given) and report what was done.

    `settings` are a `preset` name (methods/presets.py, default "paper") and CompressionConfig
    fields or part options over it (ratio, mode, allocation_a, ...). With `evaluate_ppl` (corpus
    names), perplexity is measured before and after, same protocol. Streamed (stream=True,
    resume=True, or stream=None and the model would not fit in memory): the model is read layer by
    layer from its shards and never held whole, and the result's model is None. With
    `predict_speed`, the report holds the speedup predicted by a micro-benchmark of the plan's
    layers. Returns pipeline.run.Compressed (model, tokenizer, report).

    The flat keywords are this function's public form, named as `lorap compress`'s options; they
    are sorted into one pipeline.run.CompressionJob here and nowhere else.
    """
    from .evaluate.suite import PerplexitySettings
    from .methods.presets import config_for
    from .pipeline.run import CompressionJob, compress_checkpoint
    from .pipeline.sharded import StreamOptions

    job = CompressionJob(
        model, out, config or config_for(settings.pop("preset", "paper"), **settings),
        evaluate=PerplexitySettings(tuple(evaluate_ppl), tuple(eval_seqlens), eval_max_tokens) if evaluate_ppl else None,
        overwrite=overwrite, progress=progress, stream=stream,
        stream_options=StreamOptions(resume, activation_dtype, activation_store), predict_speed=predict_speed)
    return compress_checkpoint(job)


def load(folder, fuse=True, **kwargs):
    """Load a lorap checkpoint (model, tokenizer) with lorap's classes; with `fuse`, the faster runtime
    (q/k/v's right factors in one GEMM, left factors column-major on the CPU:
    modeling_lorap.optimize_for_inference; move the model first)."""
    from transformers import AutoTokenizer

    from .io.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(folder, **kwargs)
    if fuse:
        model.optimize_for_inference()
    return model, AutoTokenizer.from_pretrained(folder)
