"""What `lorap bench` times and how often: declared once, for the CLI's flags and the timing code
(no torch here, so the CLI builds its flags before torch loads)."""
from dataclasses import dataclass

from ..errors import LorapError
from ..options import csv_of, setting


@dataclass
class BenchTiming:
    prefill_seqlens: tuple = setting((128, 512, 2048), "prompt lengths, comma-separated", flag="--prefill",
                                     parse=csv_of(int))
    batches: tuple = setting((1, 8), "prefill batch sizes, comma-separated", flag="--batch", parse=csv_of(int))
    prompt_tokens: int = setting(128, "decode: prompt tokens before generating", flag="--prompt")
    new_tokens: int = setting(128, "decode: tokens generated")
    warmup: int = setting(1, "untimed runs first")
    repeats: int = setting(5, "timed repeats of each measurement")
    compiled_decode: bool = setting(False, "also time decode as serving engines run it: a preallocated (static) KV "
                                    "cache and the forward compiled by torch.compile, a CUDA graph a token on a GPU")

    def __post_init__(self):
        self.prefill_seqlens, self.batches = tuple(self.prefill_seqlens), tuple(self.batches)

    def validate(self) -> None:
        for name, values in (("prefill lengths", self.prefill_seqlens), ("batch sizes", self.batches)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise LorapError(f"{name} must be positive integers, got {list(values)!r}")
