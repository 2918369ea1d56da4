"""Resolve what the user named as a model and load it.

A model can be: nothing (the built-in default), a local Hugging Face folder, a lorap
checkpoint folder, a `.gguf` file, or a hub id (when the hub can be reached).
"""
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorapError
from ..log import info


@dataclass
class ModelSource:
    kind: str  # "default", "folder", "lorap", "sliced", "gguf" or "hub"
    location: str  # folder, file or hub id
    name: str  # what reports call the model

    def describe(self) -> str:
        labels = {
            "default": "built-in default model",
            "folder": "local folder",
            "lorap": "lorap checkpoint",
            "sliced": "SliceGPT checkpoint",
            "gguf": "GGUF file",
            "hub": "Hugging Face hub",
        }
        return f"{self.name} ({labels[self.kind]}: {self.location})"


def _config_has(folder: Path, key: str) -> bool:
    import json

    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return key in json.loads(config.read_text())
    except ValueError:
        return False


def is_lorap_checkpoint(folder: Path) -> bool:
    return _config_has(folder, "lorap")


def is_sliced_checkpoint(folder: Path) -> bool:
    """A SliceGPT checkpoint (`lorap compress --preset slicegpt`): its own modeling file, modeling_sliced.py."""
    return _config_has(folder, "slicegpt")


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a user's model argument into a source, without loading weights."""
    from .default_model import DEFAULT_MODEL_NAME, default_model_dir

    if spec is None or spec in ("", "default"):
        return ModelSource("default", str(default_model_dir()), DEFAULT_MODEL_NAME)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LorapError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.resolve()), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorapError(f"{path} is a folder but has no config.json; point at a Hugging Face model folder")
        kind = "lorap" if is_lorap_checkpoint(path) else "sliced" if is_sliced_checkpoint(path) else "folder"
        return ModelSource(kind, str(path.resolve()), path.resolve().name)
    if path.exists():
        raise LorapError(f"{path} is a file; give a model folder, a .gguf file or a hub id")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise LorapError(f"model folder not found: {path}")
    return _hub_source(spec)


def _hub_source(model_id: str) -> ModelSource:
    from .network import hub_reachable

    if _in_hub_cache(model_id):
        return ModelSource("hub", model_id, model_id)
    if not hub_reachable():
        raise LorapError(
            f"'{model_id}' is not a local folder or file, and the Hugging Face hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE is set). Give a local model folder or .gguf file, "
            "or run without a model argument to use the built-in default model."
        )
    return ModelSource("hub", model_id, model_id)


def _in_hub_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # an invalid id is reported by the loader itself
        return False


def load_config(spec: str | None):
    """The model's config alone (no weights); a path to a config.json works too."""
    from transformers import AutoConfig

    if spec and Path(spec).name.endswith(".json") and Path(spec).is_file():
        import json

        from transformers import CONFIG_MAPPING

        data = json.loads(Path(spec).read_text())
        model_type = data.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise LorapError(f"{spec}: unknown or missing model_type {model_type!r}")
        return CONFIG_MAPPING[model_type].from_dict(data)
    source = resolve_model(spec)
    if source.kind == "gguf":
        path = Path(source.location)
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(source.location)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_tokenizer_files(folder: Path) -> None:
    """Fail clearly when a folder holds a model without its tokenizer (transformers' own error
    for that case is a traceback about protobuf)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LorapError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into the model folder (tokenizer.save_pretrained)"
        )


def load_model(spec: str | None = None, dtype=None, device: str | None = None, device_map=None, fuse: bool = True):
    """Load (model, tokenizer, source). dtype None keeps the checkpoint's own dtype.

    A lorap checkpoint gets its faster runtime (modeling_lorap.optimize_for_inference) unless `fuse` is
    False: it only changes how inference runs, never a parameter, a gradient or a saved tensor."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    if source.kind in ("default", "folder", "lorap", "sliced"):
        check_tokenizer_files(Path(source.location))
    info(f"loading {source.describe()}")
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        if source.kind == "gguf":
            from .default_model import repair_gguf_tokenizer

            path = Path(source.location)
            tokenizer = repair_gguf_tokenizer(
                AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), fix_chat_tokens=False
            )
            kwargs["dtype"] = dtype or torch.float32
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
            model.hf_quantizer = None
        elif source.kind == "lorap":
            from .checkpoint import load_checkpoint_model

            model = load_checkpoint_model(source.location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.location)
        elif source.kind == "sliced":
            from ..methods.slicegpt import load_sliced_checkpoint

            model = load_sliced_checkpoint(source.location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.location)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.location)
    except (OSError, ValueError, SafetensorError) as err:  # a truncated weights file is a SafetensorError
        if isinstance(err, LorapError):
            raise
        raise LorapError(f"could not load {source.describe()}: {err}") from err
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    if fuse and source.kind == "lorap":
        model.optimize_for_inference()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


def own_weights(model, folder=None) -> None:
    """Give every parameter and buffer its own memory instead of pages of the checkpoint file.

    from_pretrained maps a safetensors file and, where the dtype matches, keeps the tensors as
    views of that mapping. A page of it counts in the process's memory once read and stays until
    every tensor of the file is gone, so a compression that replaces the layers one by one would
    never see the dense layers' memory come back: it would end holding the whole dense file and
    the whole compressed model. With each tensor in its own memory, a dense layer is freed as soon
    as it is replaced.

    Tensors stored under the same name, dtype and shape in `folder`'s safetensors are read again
    from the file one at a time (through a mapping closed after each read), so the model's own
    mapping is never paged in whole; the rest are cloned. Either way the values are the same bits."""
    import torch

    from .shards import INDEX_FILE, SINGLE_FILE, ShardReader

    reader = None
    if folder is not None and any((Path(folder) / name).is_file() for name in (INDEX_FILE, SINGLE_FILE)):
        reader = ShardReader(folder)
    named = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, tensor in named:
            if tensor.device.type != "cpu":
                continue
            stored = reader.read([name])[name] if reader is not None and name in reader.weight_map else None
            if stored is None or stored.dtype != tensor.dtype or stored.shape != tensor.shape:
                stored = tensor.data.clone()
            tensor.data = stored
