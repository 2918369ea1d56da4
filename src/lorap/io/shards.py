"""Read the tensors of one decoder layer from (sharded) safetensors; write output shards and their index.

Reading opens a shard only for as long as it takes to copy the tensors wanted, so pages of the
memory-mapped file never pile up in the process's resident memory as the walk goes deeper.
"""
import json
import os
import re
from pathlib import Path

from ..errors import LorapError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_LAYER_PREFIX = "model.layers."  # LLaMA's; a family's own comes from Architecture.state_prefix
SAFETENSORS_METADATA = {"format": "pt"}  # what save_pretrained writes; transformers checks it on load


class ShardReader:
    """Tensor name -> shard file of a Hugging Face safetensors checkpoint (one file or an index)."""

    def __init__(self, folder, layer_prefix: str = DEFAULT_LAYER_PREFIX):
        self.folder = Path(folder)
        self._layer_key = re.compile("^" + re.escape(layer_prefix) + r"(\d+)\.")
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(self.folder / SINGLE_FILE, "pt") as handle:
                weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            raise LorapError(
                f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}; streaming reads safetensors checkpoints only "
                "(convert it with save_pretrained(..., safe_serialization=True), or compress without --stream)"
            )
        self.weight_map = dict(sorted(weight_map.items()))

    def files(self) -> list:
        return sorted({self.folder / name for name in self.weight_map.values()})

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files())

    def layer_names(self, index: int) -> list:
        return [name for name in self.weight_map if self.layer_of(name) == index]

    def other_names(self) -> list:
        """Everything outside the decoder layers: embeddings, final norm, LM head."""
        return [name for name in self.weight_map if self.layer_of(name) is None]

    def read(self, names) -> dict:
        """The named tensors, copied into ordinary (not memory-mapped) CPU tensors."""
        from safetensors import safe_open

        by_file: dict = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(self.folder / file, "pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name).clone()
        return tensors

    def shapes(self) -> dict:
        from safetensors import safe_open

        shapes = {}
        for path in self.files():
            with safe_open(path, "pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes

    def layer_of(self, name: str) -> int | None:
        match = self._layer_key.match(name)
        return int(match.group(1)) if match else None

    def check_complete(self) -> None:
        """Every shard the index names is there, and no shard is shorter than its own header says
        (a download cut short): refused now, before a long run fails in its middle."""
        for path in self.files():
            if not path.is_file():
                raise LorapError(f"{path.name} is named by {self.folder / INDEX_FILE} but missing; download it again")
            size = path.stat().st_size
            with open(path, "rb") as handle:
                prefix = handle.read(8)
                header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
                try:
                    header = json.loads(handle.read(header_length)) if header_length else None
                except ValueError:
                    header = None
            if not isinstance(header, dict):
                raise LorapError(f"{path} is not a readable safetensors file (truncated or damaged); download it again")
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
            if size < 8 + header_length + end:
                raise LorapError(f"{path} is truncated ({size} bytes, its header describes {8 + header_length + end}); "
                                 "download it again")

    def fingerprint(self) -> dict:
        """What identifies this checkpoint for a resumed run: file names, sizes and times."""
        return {path.name: [path.stat().st_size, int(path.stat().st_mtime)] for path in self.files()}


def shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_shard(folder, file_name: str, tensors: dict) -> int:
    """Write one shard atomically (temporary name, then rename); returns its bytes of tensor data."""
    from safetensors.torch import save_file

    folder = Path(folder)
    temporary = folder / f".{file_name}.tmp"
    save_file({name: tensor.contiguous() for name, tensor in sorted(tensors.items())}, temporary, SAFETENSORS_METADATA)
    os.replace(temporary, folder / file_name)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_index(folder, weight_map: dict, total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (Path(folder) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def shard_contents(folder, file_name: str) -> dict:
    """{tensor name: (shape, bytes)} of a written shard, to rebuild the index on resume."""
    from safetensors import safe_open

    contents = {}
    with safe_open(Path(folder) / file_name, "pt") as handle:
        for name in handle.keys():
            tensor_slice = handle.get_slice(name)
            shape = tuple(tensor_slice.get_shape())
            size = 1
            for dim in shape:
                size *= dim
            contents[name] = (shape, size * _dtype_bytes(tensor_slice.get_dtype()))
    return contents


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}[dtype]
