"""The DeciLM / Nemotron-NAS config class, written into every folder `lorap export --format decilm`
makes, and referenced from its config.json `auto_map` (AutoConfig, trust_remote_code). It imports
nothing from lorap.

Engines read each layer's shapes as attributes, `config.block_configs[i].attention.n_heads_in_group`
and `config.block_configs[i].ffn.ffn_mult` (vLLM's DeciLMForCausalLM also takes
`ffn.intermediate_size` when `ffn_mult` is absent), so this class turns the JSON dicts into objects
that have exactly the keys the file gives: an absent key must stay absent.
"""
from types import SimpleNamespace

from transformers import LlamaConfig


class BlockSection(SimpleNamespace):
    """One layer's attention or FFN settings, as attributes."""


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [
            block if not isinstance(block, dict)
            else SimpleNamespace(attention=BlockSection(**block["attention"]), ffn=BlockSection(**block["ffn"]))
            for block in block_configs or []
        ]

    def to_dict(self):
        output = super().to_dict()
        output["block_configs"] = [{"attention": dict(vars(block.attention)), "ffn": dict(vars(block.ffn))}
                                   for block in self.block_configs]
        return output
