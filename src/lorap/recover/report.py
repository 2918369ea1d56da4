"""The text summary of a recovery report."""


def format_recovery(report: dict) -> str:
    """A short text summary of a recovery report (numbers as recorded, never recomputed)."""
    data = report["data"]
    minutes = report["train_seconds"] / 60
    lines = [
        f"recovered: {report['source']} -> {report['output']}",
        f"data: {data['source']} ({data['format']}; {data['train_examples']} train / "
        f"{data['validation_examples']} held-out examples, cutoff {data['cutoff']})",
        *_pooled(data),
        f"steps: {report['steps']} of {report['total_steps']} ({report['epochs_done']} epochs, "
        f"{report['tokens_seen']:,} tokens, stopped by {report['stopped_by']}), {minutes:.1f} min of training",
        *_learning_rate(report),
        f"trained: {_trained(report)}; loss: {_loss(report['loss'])}",
        f"validation loss{_scored(report)}: {report['validation_loss_before']:.4f} before -> "
        f"{report['best_validation_loss']:.4f} best (step {report['best_step']}, "
        f"{'merged' if report['method'] == 'lora' else 'kept'})",
        f"parameters: {report['parameters']:,} (unchanged)",
    ]
    if "peak_memory" in report:
        lines.append(f"peak memory: {report['peak_memory']['host_rss_mb']:.0f} MB host RSS"
                     + (f", {report['peak_memory']['device_allocated_mb']:.0f} MB on the device"
                        if "device_allocated_mb" in report["peak_memory"] else ""))
    if "distillation" in report["loss"]:
        lines.insert(-1, f"held-out next-token loss: {report['validation_nll_before']:.4f} before -> "
                         f"{report['best_validation_nll']:.4f} at the best step")
    return "\n".join(lines)


def _scored(report: dict) -> str:
    """How many held-out examples each evaluation scored (not said by a report written before it was recorded)."""
    scored = report.get("validation_examples_scored")
    return f" ({scored} held-out examples)" if scored is not None else ""


def _learning_rate(report: dict) -> list:
    """One line on the schedule the run followed (none for a report written before it was recorded)."""
    if "learning_rate" not in report:
        return []
    rate = report["learning_rate"]
    ends = f"decaying to zero at step {rate['decay_ends_at_step']}"
    if rate["with_time_budget"]:
        ends += f" or as the {report['settings']['max_minutes']:g}-minute budget runs out, whichever comes first"
    last = f"; {rate['last']:.2g} at the last step" if rate["last"] is not None else ""
    return [f"learning rate: peak {rate['peak']:g}, {rate['warmup_steps']} warmup steps, {ends}{last}"]


def _pooled(data: dict) -> list:
    """One line on how pooled sources share the training examples (none for a single source)."""
    if "sources" not in data:
        return []
    if data.get("mix") == "equal":
        parts = [f"{part['source']} {part['train_share']} ({part['passes']:g} passes)" for part in data["sources"]]
        return ["equal shares: " + ", ".join(parts)]
    return ["pooled by size: " + ", ".join(f"{part['source']} {part['examples']} examples" for part in data["sources"])]


def _trained(report: dict) -> str:
    if report["method"] == "lora":
        lora = report["lora"]
        return f"LoRA r {lora['r']} on {lora['target_modules']} linears"
    return f"full ({report['trained']})"


def _loss(loss: dict) -> str:
    if "distillation" not in loss:
        return "next-token"
    parts = [f"{loss['distillation']:g} x distillation (T {loss['temperature']:g}) from {loss['teacher']}"]
    if loss["next_token"]:
        parts.append(f"{loss['next_token']:g} x next-token")
    if loss.get("layer_outputs"):
        parts.append(f"{loss['layer_outputs']:g} x layer outputs")
    return " + ".join(parts)
