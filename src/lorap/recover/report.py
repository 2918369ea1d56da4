"""The text summary of a recovery report."""


def format_recovery(report: dict) -> str:
    """A short text summary of a recovery report (numbers as recorded, never recomputed)."""
    data = report["data"]
    minutes = report["train_seconds"] / 60
    lines = [
        f"recovered: {report['source']} -> {report['output']}",
        f"data: {data['source']} ({data['format']}; {data['train_examples']} train / "
        f"{data['validation_examples']} held-out examples, cutoff {data['cutoff']})",
        f"steps: {report['steps']} of {report['total_steps']} ({report['epochs_done']} epochs, "
        f"{report['tokens_seen']:,} tokens, stopped by {report['stopped_by']}), {minutes:.1f} min of training",
        f"validation loss: {report['validation_loss_before']:.4f} before -> "
        f"{report['best_validation_loss']:.4f} best (step {report['best_step']}, merged)",
        f"parameters: {report['parameters']:,} (unchanged)",
    ]
    return "\n".join(lines)
