"""Full fine-tuning: which weights train, and whether this machine has the memory for them.

Every weight of the compressed model trains (both factors of each pair, the kept FFN channels, the
dense projections and the norms); the embeddings and the LM head stay frozen unless asked, since
they are a large share of a small model, untouched by compression, and the first thing to drift
toward the training text's vocabulary."""
from ..errors import LorapError
from ..log import info

ADAM_BYTES_PER_WEIGHT = 4 + 4 + 8  # float32 gradient, the two moments (the weight itself is counted apart)
BEST_STATE_BYTES_PER_WEIGHT = 4  # the best state by held-out loss is kept as a copy
RUNTIME_BYTES = 600 * 2**20  # Python, torch, tokenizer and data


def make_fully_trainable(model, train_embeddings: bool) -> None:
    model.requires_grad_(True)
    if not train_embeddings:
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)


def activation_bytes(config, batch_size: int, cutoff: int, checkpointed: bool = False) -> int:
    """A rough upper figure for what backward keeps of one micro-batch: per layer and token, about a
    dozen hidden-size vectors (norms, attention in and out, residuals) and four FFN-width ones, and
    per layer the attention probabilities of eager attention; float32. With the decoder layers
    `checkpointed`, every layer keeps only its input, and one layer at a time the rest."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    width = getattr(config, "intermediate_size", 4 * hidden)
    per_layer = batch_size * cutoff * (12 * hidden + 4 * width) + 2 * batch_size * config.num_attention_heads * cutoff**2
    if checkpointed:
        return 4 * (layers * batch_size * cutoff * hidden + per_layer)
    return 4 * layers * per_layer


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0


def training_bytes(model, teacher, batch_size: int, cutoff: int) -> int:
    """Estimated peak memory of full fine-tuning: weights, gradients, Adam, the best copy, the
    teacher, the activations of one micro-batch, the loss's logits chunks and the runtime."""
    from .objective import LOGITS_BYTES_AT_ONCE

    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (_bytes(model) + trained * (ADAM_BYTES_PER_WEIGHT + BEST_STATE_BYTES_PER_WEIGHT) + _bytes(teacher)
            + activation_bytes(model.config, batch_size, cutoff, getattr(model, "is_gradient_checkpointing", False))
            + 6 * LOGITS_BYTES_AT_ONCE + RUNTIME_BYTES)


def check_memory(model, teacher, device, batch_size: int, cutoff: int) -> int:
    """Refuse before training a full fine-tune that cannot fit; returns the estimate in bytes.

    The models are loaded by now, so what must still fit is the estimate less their weights."""
    from ..devices import free_memory_bytes

    needed = training_bytes(model, teacher, batch_size, cutoff)
    still_needed = needed - _bytes(model) - _bytes(teacher) - (RUNTIME_BYTES if device.type == "cpu" else 0)
    available = free_memory_bytes(device)
    where = f"free on {device}" if device.type == "cuda" else "available on this machine"
    gib = 2**30
    info(f"full fine-tuning needs about {needed / gib:.1f} GiB (weights, gradients, Adam state, best copy"
         f"{', teacher' if teacher is not None else ''}, activations)")
    if available is not None and still_needed > available:
        raise LorapError(
            f"full fine-tuning needs about {needed / gib:.1f} GiB: {still_needed / gib:.1f} GiB more than the models "
            f"already loaded, and {available / gib:.1f} GiB are {where}. "
            "Use LoRA instead (drop --full), or a smaller --batch-size or --cutoff"
            + (", or no teacher" if teacher is not None else "")
        )
    return needed
