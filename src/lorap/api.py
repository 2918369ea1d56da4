"""The public Python surface: evaluate(), compress(), plan(), load()."""
from .counting import count_parameters
from .models import load_model
from .provenance import environment


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def perplexity(model, tokenizer, dataset="wiki", seqlen=128, max_tokens=None) -> float:
    from .evaluate.perplexity import perplexity as _perplexity

    return _perplexity(model, tokenizer, dataset, seqlen, max_tokens)


def evaluate(model=None, ppl=("wiki",), seqlens=(128,), max_tokens=None, device=None) -> dict:
    """Perplexity of a model given by name/path, as the JSON `lorap eval` writes."""
    from .evaluate.perplexity import perplexity_table

    device = device or default_device()
    loaded, tokenizer, source = load_model(model, device=device)
    return {
        "model": source.name,
        "source": source.describe(),
        "parameters": count_parameters(loaded),
        "perplexity": perplexity_table(loaded, tokenizer, ppl, seqlens, max_tokens),
        "protocol": protocol(max_tokens),
        **environment(device),
    }


def protocol(max_tokens=None) -> dict:
    from .data import DOCUMENT_SEPARATOR

    return {
        "split": "test",
        "documents_joined_with": DOCUMENT_SEPARATOR,
        "windows": "non-overlapping, tail dropped",
        "perplexity": "exp(mean token NLL over all predicted tokens)",
        "max_tokens": max_tokens,
    }
