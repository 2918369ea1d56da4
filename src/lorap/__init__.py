"""lorap: LoRAP structured compression for LLaMA-family language models."""

__version__ = "0.1.0"

# The public surface is imported lazily so that `import lorap` stays cheap and the
# CLI can print usage errors before torch and transformers are loaded.
_PUBLIC = {
    "compress": "lorap.api",
    "load": "lorap.api",
    "plan": "lorap.api",
    "perplexity": "lorap.api",
    "load_model": "lorap.io.models",
    "recover": "lorap.recover.run",
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lorap' has no attribute {name!r}")


__all__ = ["__version__", *_PUBLIC]
