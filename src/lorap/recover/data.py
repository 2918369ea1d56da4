"""Recovery data: the source (alpaca-cleaned, wiki, a hub corpus or a local file), its tokenized
examples, the seeded held-out split, and the padded batches."""
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorapError
from .config import RecoveryConfig

DEFAULT_HUB_DATA = "alpaca"  # yahma/alpaca-cleaned, as in method.md
OFFLINE_DATA = "wiki"


@dataclass
class RecoveryData:
    """Tokenized examples: (input_ids, labels) lists, labels -100 where nothing is learned."""

    train: list
    validation: list
    description: dict


def resolve_data(source: str | None) -> str:
    if source is not None:
        return source
    from ..io.network import hub_reachable

    return DEFAULT_HUB_DATA if hub_reachable() else OFFLINE_DATA


def _text_windows(stream, cutoff: int) -> list:
    count = stream.numel() // cutoff
    windows = stream[: count * cutoff].view(count, cutoff).tolist()
    return [(ids, ids) for ids in windows]


def load_examples(tokenizer, source: str, cutoff: int):
    """All examples of a source, or of several pooled with '+' (`wiki+notes.txt`: text of more than one
    domain, each contributing every example it has, so in proportion to its size unless prepare_data
    evens the shares; instructions and text may be pooled), and a description of what they are
    (format, counts, and each source's count where there are several)."""
    from ..io.data import pooled_sources

    sources = pooled_sources(source)
    if len(sources) == 1:
        return _source_examples(tokenizer, source, cutoff)
    examples, parts = [], []
    for one in sources:
        found, description = _source_examples(tokenizer, one, cutoff)
        examples += found
        parts.append({"source": one, "examples": len(found), **description})
    formats = sorted({part["format"] for part in parts})
    return examples, {"format": formats[0] if len(formats) == 1 else "+".join(formats),
                      "dropped": sum(part["dropped"] for part in parts), "sources": parts}


def _source_examples(tokenizer, source: str, cutoff: int):
    from ..io import data, instructions

    path = Path(source.split(".jsonl:")[0] + (".jsonl" if ".jsonl:" in source else "")).expanduser()
    records = documents = None
    if source == "wiki" or source in data.HUB_CORPORA:
        stream = data.token_stream(tokenizer, source, "train")
        return _text_windows(stream, cutoff), {"format": "text", "split": "train", "dropped": 0}
    if path.suffix in (".json", ".jsonl", ".txt"):
        if not path.is_file():
            raise LorapError(f"recovery data file not found: {path}")
        if path.suffix == ".json":
            records = instructions.check_records(instructions.read_local_records(path), str(path))
        elif path.suffix == ".jsonl" and ".jsonl:" not in source:
            first = next(iter(instructions.read_local_records(path)), None)
            if instructions.is_instruction_record(first):
                records = instructions.check_records(instructions.read_local_records(path), str(path))
        if records is None:
            documents = data.local_documents(source)
    else:
        records, documents = instructions.hub_data(source)
    if records is not None:
        examples, dropped = instructions.encode_records(tokenizer, records, cutoff)
        if not examples:
            raise LorapError(f"{source}: no record has a response within the cutoff of {cutoff} tokens")
        return examples, {"format": "instructions", "prompt": "alpaca", "dropped": dropped}
    import torch

    text = data.DOCUMENT_SEPARATOR.join(documents)
    stream = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    return _text_windows(stream, cutoff), {"format": "text", "dropped": 0}


def prepare_data(tokenizer, source: str, config: RecoveryConfig) -> RecoveryData:
    """Examples split by a seeded shuffle into held-out validation and training; sources pooled with '+'
    get equal shares of both (equal_shares), or with config.data_mix "size" keep their sizes."""
    import torch

    examples, description = load_examples(tokenizer, source, config.cutoff)
    val_size = config.val_size if config.val_size is not None else min(2000, max(1, len(examples) // 20))
    if len(examples) < val_size + 1:
        raise LorapError(
            f"'{source}' gives {len(examples)} examples of at most {config.cutoff} tokens: too few for "
            f"{val_size} held out and some to train on. Use a larger corpus, a smaller --cutoff or --val-size."
        )
    pooled = "sources" in description
    if pooled and config.data_mix == "equal":
        train_size = len(examples) - val_size
        if config.max_examples is not None:
            train_size = min(train_size, config.max_examples)
        train, validation = equal_shares(examples, description["sources"], val_size, train_size, config.seed)
        description["mix"] = "equal"
    else:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
        validation = [examples[i] for i in order[:val_size]]
        train = [examples[i] for i in sorted(order[val_size:])]
        if pooled:
            description["mix"] = "size"
    if config.max_examples is not None:
        train = train[: config.max_examples]
    description.update(
        source=source,
        cutoff=config.cutoff,
        train_examples=len(train),
        validation_examples=len(validation),
        train_tokens=sum(len(ids) for ids, _ in train),
    )
    return RecoveryData(train, validation, description)


def equal_shares(examples: list, sources: list, val_size: int, train_size: int, seed: int) -> tuple:
    """(train, validation): `train_size` and `val_size` examples with every pooled source holding an
    equal share of each. `examples` are the sources' examples in order, `sources` their descriptions
    (each is updated with its shares).

    Each source gives its held-out share first, drawn by a seeded shuffle, so no held-out example is
    trained on. prepare_data keeps the pooled size (so an epoch is as long as with --data-mix size)
    unless --max-examples caps it. A source with fewer examples than its share is repeated (whole
    passes, then a seeded subset); a larger one is sampled. The sources alternate in the list."""
    import itertools

    import torch

    from ..io.data import even_shares

    generator = torch.Generator().manual_seed(seed)
    held_shares = even_shares(val_size, len(sources))
    train_shares = even_shares(train_size, len(sources))
    validation, per_source, start = [], [], 0
    for part, held, share in zip(sources, held_shares, train_shares):
        count = part["examples"]
        if count < held + 1:
            raise LorapError(f"'{part['source']}' gives {count} examples: too few for its {held} held out and some "
                             "to train on with --data-mix equal. Use a smaller --val-size or a larger corpus.")
        order = (start + torch.randperm(count, generator=generator)).tolist()
        validation += [examples[i] for i in order[:held]]
        pool = sorted(order[held:])
        passes, rest = divmod(share, len(pool))
        extra = sorted(pool[i] for i in torch.randperm(len(pool), generator=generator)[:rest].tolist())
        per_source.append([examples[i] for i in pool * passes + extra])
        part.update(train_share=share, held_out=held, passes=round(share / len(pool), 2))
        start += count
    train = [example for group in itertools.zip_longest(*per_source) for example in group if example is not None]
    return train, validation


def collate(examples: list, pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    import torch

    from ..io.instructions import IGNORE_INDEX

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(targets)] = torch.tensor(targets)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels
