"""What `lorap plan` reports before any weight loads: the plan, the peak memory a run will need,
what calibration data will change in it, and (optionally) the speedup its shapes predict."""
from ..methods.registry import FFN_ALLOCATIONS, RANK_ALLOCATIONS
from .memory import memory_estimate
from .plan import make_plan


def _calibration_notes(config) -> list:
    """What a run decides from calibration data, where the plan can only show shapes' defaults."""
    notes = []
    if config.removes_layers:
        return ["which layers are removed depends on calibration data: the layers shown removed are placeholders; "
                "a run removes as many, those that change the residual stream least (lowest Block Influence)"]
    if FFN_ALLOCATIONS[config.ffn_allocation].needs_whole_model and config.ffn == "channels":
        notes.append("adaptive heads and widths depend on calibration data: the head counts and widths shown are "
                     "uniform; a run removes as many parameters, heads and channels chosen across layers by their scores"
                     if config.attention == "heads" else
                     "adaptive FFN widths depend on calibration data: the widths shown are uniform; a run removes "
                     "the same total of channels, spread over layers by their scores")
    if RANK_ALLOCATIONS[config.rank_allocation].needs_whole_model:
        notes.append("adaptive ranks depend on calibration data: the ranks shown are the a:1 rule's; a run shares each "
                     "layer's pair budget between its projections by their spectra")
    return notes


def plan_report(model_config, config, predict_speed: bool = True) -> dict:
    """The plan of `config` (pipeline.config.CompressionConfig) for a model's config, as a dict:
    Plan.to_dict() plus `memory_estimate`, `note` where calibration data will change the shapes, and
    `predicted_speed` (a micro-benchmark of the plan's layers on this machine, seconds) if asked."""
    planned = make_plan(model_config, config.plan_settings())
    report = planned.to_dict()
    report["memory_estimate"] = memory_estimate(model_config, planned, config.calibration_samples,
                                                config.calibration_seqlen, config.batch_size,
                                                gram_sources=config.gram_sources(),
                                                whole_model_parts=config.whole_model_parts())
    notes = _calibration_notes(config)
    if notes:
        report["note"] = "; ".join(notes)
    if predict_speed:
        from ..bench.predict import predict_speedup

        report["predicted_speed"] = predict_speedup(model_config, planned, config.device)
    return report
