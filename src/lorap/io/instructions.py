"""Alpaca-style instruction data for recovery: records, the prompt template, and tokenization
with the prompt masked from the loss.

A record has `instruction`, optional `input` and `output`. The prompt is the Alpaca template
(as in alpaca-lora and LLM-Pruner's post-training); only the response and the end-of-text token
are learned, every prompt token gets the label -100.

Sources: a local .json file (a list of records, like alpaca_data_cleaned.json) or .jsonl file
(one record per line), or a hub dataset (`alpaca` is short for yahma/alpaca-cleaned).
"""
import json
from pathlib import Path

from ..errors import LorapError

IGNORE_INDEX = -100  # the label torch's cross entropy (and transformers) skip
ALPACA_HUB_ID = "yahma/alpaca-cleaned"
HUB_ALIASES = {"alpaca": ALPACA_HUB_ID, "alpaca-cleaned": ALPACA_HUB_ID}
REQUIRED_FIELDS = ("instruction", "output")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def is_instruction_record(record) -> bool:
    return isinstance(record, dict) and all(field in record for field in REQUIRED_FIELDS)


def prompt_of(record: dict) -> str:
    if str(record.get("input") or "").strip():
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def read_local_records(path: Path) -> list:
    """All records of a local .json (a list, or {"data"/"train": [...]}) or .jsonl file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise LorapError(f"{path}: not valid JSON ({err})") from err
        if isinstance(data, dict):
            data = data.get("train", data.get("data"))
        if not isinstance(data, list):
            raise LorapError(f"{path}: expected a JSON list of records (instruction / input / output)")
        return data
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise LorapError(f"{path}:{number}: not valid JSON ({err})") from err
    return records


def check_records(records: list, where: str) -> list:
    bad = next((i for i, record in enumerate(records) if not is_instruction_record(record)), None)
    if bad is not None:
        raise LorapError(
            f"{where}: record {bad + 1} lacks the fields {', '.join(REQUIRED_FIELDS)} "
            "(instruction data needs instruction / input / output)"
        )
    if not records:
        raise LorapError(f"{where}: no instruction records")
    return records


def hub_data(name: str):
    """The train split of a hub dataset: (records, None) for instruction data, or (None, documents)
    for plain text (a `text` field)."""
    from .network import hub_reachable

    dataset_id = HUB_ALIASES.get(name, name)
    if not hub_reachable():
        raise LorapError(
            f"'{name}' comes from the Hugging Face hub, which cannot be reached here. "
            "Use the built-in 'wiki' corpus, or a local .json/.jsonl file of instruction records "
            "(e.g. alpaca_data_cleaned.json) or a .txt file."
        )
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:  # datasets raises many types; all mean "could not get it"
        raise LorapError(f"could not load '{dataset_id}' from the hub: {err}") from err
    columns = set(dataset.column_names)
    if set(REQUIRED_FIELDS) <= columns:
        return [dict(record) for record in dataset], None
    if "text" in columns:
        return None, [text for text in dataset["text"] if text]
    raise LorapError(f"'{dataset_id}' has neither instruction/output fields nor a text field (columns: {sorted(columns)})")


def encode_records(tokenizer, records: list, cutoff: int):
    """(input_ids, labels) per record as lists of ints, at most `cutoff` tokens, prompt labels -100.

    Prompt and response are tokenized separately and concatenated, so the mask falls exactly on
    the prompt however the tokenizer would merge across the boundary. A record whose prompt
    fills the cutoff teaches nothing and is dropped; the second value counts those.
    """
    prompts = tokenizer([prompt_of(record) for record in records], verbose=False)["input_ids"]
    responses = tokenizer(
        [str(record["output"]) for record in records], add_special_tokens=False, verbose=False
    )["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, dropped = [], 0
    for prompt, response in zip(prompts, responses):
        ids = (prompt + response + eos)[:cutoff]
        labels = ([IGNORE_INDEX] * len(prompt) + response + eos)[:cutoff]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            dropped += 1
            continue
        examples.append((ids, labels))
    return examples, dropped
