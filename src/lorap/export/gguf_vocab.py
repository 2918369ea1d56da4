"""The tokenizer as GGUF metadata: what llama.cpp needs to turn text into the model's token ids.

Two kinds of Hugging Face tokenizer are written:
- byte-level BPE (GPT-2 style: SmolLM, LLaMA-3, Qwen2): tokens, their types and the merges, with
  llama.cpp's name for the pre-tokenizer (how text is split before BPE), which it cannot infer;
- byte-fallback BPE / SentencePiece (LLaMA 1/2, Mistral, TinyLlama): read by gguf's LlamaHfVocab.
Special token ids, add-BOS flags and the chat template come from gguf's SpecialVocab.
"""
import json
from pathlib import Path

from ..errors import LorapError

# llama.cpp's pre-tokenizer names for byte-level BPE families lorap knows (llama-vocab.cpp).
# Why a table: the split rules are a regex inside llama.cpp chosen by this name; the HF tokenizer
# holds its own regex, which llama.cpp does not read.
PRE_TOKENIZERS = {"smollm": "smollm", "llama-3": "llama-bpe", "qwen2": "qwen2"}


def source_gguf_pre(path: Path) -> str | None:
    """The pre-tokenizer name recorded in an existing GGUF file (the built-in model's)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def guess_pre_tokenizer(config, tokenizer) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer, or None when unknown."""
    if config.model_type == "qwen2":
        return PRE_TOKENIZERS["qwen2"]
    if len(tokenizer) >= 128000 and "<|begin_of_text|>" in tokenizer.get_vocab():
        return PRE_TOKENIZERS["llama-3"]
    if len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.get_vocab():  # SmolLM / SmolLM2
        return PRE_TOKENIZERS["smollm"]
    return None


def _byte_level(tokenizer_json: dict) -> bool:
    """A GPT-2 style tokenizer: BPE over bytes mapped to printable characters (a ByteLevel pre-tokenizer).
    Judged by the pre-tokenizer, not by `byte_fallback`, which transformers' GGUF import sets on these too."""
    def has_byte_level(step) -> bool:
        return bool(step) and (step.get("type") == "ByteLevel"
                               or any(has_byte_level(inner) for inner in step.get("pretokenizers") or ()))

    return tokenizer_json.get("model", {}).get("type") == "BPE" and has_byte_level(tokenizer_json.get("pre_tokenizer"))


def add_tokenizer(writer, folder: Path, tokenizer, vocab_rows: int, pre: str | None) -> dict:
    """Write the tokenizer of the HF folder `folder` (loaded as `tokenizer`); returns what was written.

    `vocab_rows` is the embedding's row count: the token list is padded to it, as llama.cpp
    requires one token per row. `pre` is the pre-tokenizer name (None: llama.cpp's default split,
    which may tokenize some text differently; the report says so)."""
    import gguf

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise LorapError(f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    if _byte_level(data):
        tokens, types = _byte_level_tokens(tokenizer, vocab_rows)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        kind = "gpt2"
    else:
        vocab = gguf.LlamaHfVocab(Path(folder))
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        if len(tokens) > vocab_rows:
            raise LorapError(f"the tokenizer has {len(tokens)} tokens but the embedding only {vocab_rows} rows")
        for index in range(len(tokens), vocab_rows):
            tokens.append(f"[PAD{index}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        kind, pre = "llama", "default"
    gguf.SpecialVocab(Path(folder), load_merges=kind == "gpt2", n_vocab=vocab_rows).add_to_gguf(writer, quiet=True)
    return {"model": kind, "pre": pre or "default", "tokens": vocab_rows}


def _byte_level_tokens(tokenizer, vocab_rows: int) -> tuple[list, list]:
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_rows:
        raise LorapError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {vocab_rows} rows")
    tokens = [f"[PAD{index}]" for index in range(vocab_rows)]
    types = [gguf.TokenType.UNUSED] * vocab_rows
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    for token, index in vocab.items():
        tokens[index] = token
        if token in added:
            types[index] = gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED
        else:
            types[index] = gguf.TokenType.NORMAL
    return tokens, types
