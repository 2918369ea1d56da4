"""Shared fixtures: a small tokenizer trained on the built-in corpus and tiny models of every
supported architecture (built in milliseconds, so most tests need no real weights)."""
import os

import pytest
import torch

# The tests never need a network; say so up front so nothing waits on retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Each pytest-xdist worker takes its share of the cores: two workers of two threads each on two cores
# contend for them, and the tiny models gain nothing from a second thread.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))

TINY_VOCAB = 512

TINY_ARCHITECTURES = {
    # name: (config class name, extra config)
    "llama_mha": ("LlamaConfig", {"num_key_value_heads": 4}),
    "llama_gqa": ("LlamaConfig", {"num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2}),  # q/k/v carry a bias
    # fused qkv_proj and gate_up_proj; its default pad id (32000) is outside a tiny vocabulary
    "phi3": ("Phi3Config", {"num_key_value_heads": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 0}),
    # head_dim 32 with 4 heads on a hidden size of 64: q and o are not square; GeLU-gated FFN
    "gemma": ("GemmaConfig", {"num_key_value_heads": 2, "head_dim": 32}),
}


def tiny_config(arch: str, **overrides):
    import transformers

    class_name, extra = TINY_ARCHITECTURES[arch]
    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    settings.update(extra)
    settings.update(overrides)
    return getattr(transformers, class_name)(**settings)


def build_tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    if arch == "qwen2":
        # Qwen2 initialises biases to zero; make them matter so bias handling is tested.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _short_speed_predictions():
    """Every `compress` and `plan` predicts its speedup by a micro-benchmark (bench/predict.py) of
    512-token forwards repeated for up to 3 s: most of a tiny model's compression time, and no test
    but tests/test_predict.py looks at its numbers. Here it runs the same code on 32 tokens, once,
    unless a caller asks for more."""
    from lorap.bench import predict

    full = predict.predict_speedup

    def short(model_config, plan, device=None, dtype=None, prefill_tokens=32, repeats=1, budget_s=0.0):
        return full(model_config, plan, device, dtype, prefill_tokens, repeats, budget_s)

    predict.predict_speedup = short
    yield
    predict.predict_speedup = full


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on ~300 kB of the wiki train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorap.io.data import wiki_documents

    texts = wiki_documents("train")[:400]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.name_or_path = "tiny-bpe-512"
    return wrapped


@pytest.fixture(params=sorted(TINY_ARCHITECTURES))
def tiny_arch(request):
    return request.param


@pytest.fixture
def tiny_model(tiny_arch):
    return build_tiny_model(tiny_arch)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_arch, tiny_tokenizer):
    """A tiny model of each architecture saved as an ordinary HF folder, with its tokenizer."""
    folder = tmp_path / f"tiny-{tiny_arch}"
    build_tiny_model(tiny_arch).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model (converted once into the user's lorap cache)."""
    from lorap.io.default_model import default_model_dir as _default_model_dir

    return _default_model_dir()


@pytest.fixture(scope="session")
def compressed_dirs(tmp_path_factory, tiny_tokenizer):
    """{name: lorap checkpoint folder} of tiny LLaMA-layout models: factor pairs and uneven FFN widths
    (adaptive, with a down-projection bias), factor pairs with even widths, FFN channels only, even
    widths with a down-projection bias, Qwen2 (q/k/v biases) compressed by best, heads removed, heads
    narrowed (LLaMA and Qwen2), every projection factorized (SVD-LLM) and a layer removed (ShortGPT).
    Compressed once per session: tests/test_export.py and tests/test_export_llamacpp.py read the same
    checkpoints and never change them."""
    from lorap import api

    root = tmp_path_factory.mktemp("export")
    for arch in ("llama_gqa", "qwen2"):
        build_tiny_model(arch).save_pretrained(root / arch)
        tiny_tokenizer.save_pretrained(root / arch)
    common = dict(progress=False, calibration_samples=8, calibration_seqlen=32, predict_speed=False)
    folders = {}
    for name, (arch, settings) in {
        "best": ("llama_gqa", dict(preset="best", ratio=0.3, mode="exact", align=1)),
        "paper": ("llama_gqa", dict(preset="paper", ratio=0.4)),
        "ffn-only": ("llama_gqa", dict(preset="ffn-only", ratio=0.3)),
        "lstsq": ("llama_gqa", dict(preset="lstsq", ratio=0.3)),  # uniform widths with a down bias: `llama` + bias
        "qwen2-best": ("qwen2", dict(preset="best", ratio=0.3, mode="exact", align=1)),  # q/k/v biases too
        "heads": ("llama_gqa", dict(preset="wanda-sp", ratio=0.4, align=1)),  # one of two KV groups removed
        "heads-bias": ("llama_gqa", dict(preset="wanda-sp", ratio=0.4, align=1, head_update="bias")),  # o_proj bias
        # heads narrowed (padded back with zeros on export), with and without q/k/v biases
        "headdim": ("llama_gqa", dict(preset="best", attention="headdim", ratio=0.3, mode="exact", align=1)),
        "qwen2-headdim": ("qwen2", dict(preset="best", attention="headdim", ratio=0.3, mode="exact", align=1)),
        "svd-llm": ("llama_gqa", dict(preset="svd-llm", ratio=0.3)),  # every projection a factor pair, the FFN's too
        "shortgpt": ("llama_gqa", dict(preset="shortgpt", ratio=0.4)),  # one of two layers removed whole
    }.items():
        api.compress(str(root / arch), root / name, **common, **settings)
        folders[name] = root / name
    return folders
