"""Recovery on tiny compressed models: LoRA on dense and factor linears, the merge, the data
(instructions with the prompt masked, plain text), bit-exact resumption and the CLI."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_model
from lorap import api
from lorap.plan.counting import count_parameters
from lorap.errors import LorapError
from lorap.io.instructions import IGNORE_INDEX, encode_records, prompt_of
from lorap.modeling_lorap import LowRankLinear
from lorap.recover.config import RecoveryConfig
from lorap.recover.data import collate, load_examples, prepare_data, resolve_data
from lorap.recover.heldout import MIN_SCORED, HeldOut, scored_count
from lorap.recover.lora import attach_lora, lora_target_names
from lorap.recover.run import format_recovery, recover
from lorap.recover.schedule import Schedule
from lorap.recover.training import Clock
from test_compress import SMALL, assert_reloads_without_lorap

# Tiny runs: a 64-token cutoff, 8 held out, batches of 4; a high learning rate so a few steps show.
FAST = dict(cutoff=64, val_size=8, batch_size=4, lr=2e-2, eval_every=3, save_every=2, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local text corpus of ~60 kB of wiki train articles (tokenizing it takes milliseconds)."""
    from lorap.io.data import wiki_documents

    path = tmp_path_factory.mktemp("corpus") / "wiki-slice.txt"
    path.write_text("\n\n".join(wiki_documents("train")[:60]), encoding="utf-8")
    return str(path)


def _compressed(arch, root, tokenizer, **settings):
    """A tiny model compressed at 50% (attention factorized, or as `settings` say; FFN pruned) as a lorap checkpoint."""
    dense = root / "dense"
    build_tiny_model(arch, vocab_size=len(tokenizer)).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    api.compress(str(dense), root / "compressed", ratio=0.5, progress=False, **{**SMALL, **settings})
    return root / "compressed"


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, tiny_tokenizer):
    return _compressed("llama_gqa", tmp_path_factory.mktemp("recover-llama"), tiny_tokenizer)


@pytest.fixture(scope="module", params=["llama_gqa", "qwen2", "qwen2-headdim"])
def compressed_any(request, tmp_path_factory, tiny_tokenizer):
    """Every architecture whose factors differ in kind: plain, with q/k/v biases (Qwen2), and heads
    narrowed (plain narrower matrices and the narrowed attention's forward)."""
    arch, _, attention = request.param.partition("-")
    settings = dict(attention=attention, align=1) if attention else {}
    return _compressed(arch, tmp_path_factory.mktemp(f"recover-{request.param}"), tiny_tokenizer, **settings)


RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Repeat the word.", "input": "echo", "output": "echo echo"},
] * 10


def test_lora_attaches_to_dense_projections_and_both_factors(compressed_any):
    model, _ = api.load(compressed_any)
    targets = lora_target_names(model)
    expected = []
    for index, layer in enumerate(model.model.layers):
        for kind, module in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name, child in module.named_children():
                prefix = f"model.layers.{index}.{kind}.{name}"
                if isinstance(child, LowRankLinear):
                    expected += [f"{prefix}.right", f"{prefix}.left"]
                elif isinstance(child, torch.nn.Linear):
                    expected.append(prefix)
    assert sorted(targets) == sorted(expected)
    pairs = any(isinstance(module, LowRankLinear) for module in model.modules())
    assert any(t.endswith("q_proj.right") for t in targets) == pairs and any(t.endswith("down_proj") for t in targets)
    assert not any("lm_head" in t or "embed" in t for t in targets)
    peft_model = attach_lora(model, RecoveryConfig(lora_r=4))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets) and all("lora_" in name for name in trainable)


def test_merged_outputs_equal_the_adapter_wrapped_outputs(compressed_any):
    model, _ = api.load(compressed_any)
    before = count_parameters(model)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    peft_model = attach_lora(model, RecoveryConfig(lora_r=4))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); give it a real effect to merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    inputs = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        wrapped = peft_model(inputs).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(inputs).logits
        base_outputs_changed = (wrapped - api.load(compressed_any)[0](inputs).logits).abs().max()
    assert base_outputs_changed > 1e-3  # the adapter did something, so the comparison means something
    assert (merged - wrapped).abs().max() <= 1e-5
    assert count_parameters(merged_model) == before
    assert {name: p.shape for name, p in merged_model.named_parameters()} == shapes


def test_instruction_prompts_are_masked_from_the_loss(tiny_tokenizer):
    examples, dropped = encode_records(tiny_tokenizer, RECORDS[:3], cutoff=256)
    assert dropped == 0
    for record, (ids, labels) in zip(RECORDS, examples):
        prompt = tiny_tokenizer(prompt_of(record))["input_ids"]
        response = tiny_tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        assert ids == prompt + response + [tiny_tokenizer.eos_token_id]
        assert labels == [IGNORE_INDEX] * len(prompt) + response + [tiny_tokenizer.eos_token_id]
    assert "### Input:\n2 and 3" in prompt_of(RECORDS[1]) and "### Input" not in prompt_of(RECORDS[0])
    # Truncation keeps the mask aligned; a prompt that fills the cutoff teaches nothing and is dropped.
    prompt_len = len(tiny_tokenizer(prompt_of(RECORDS[0]))["input_ids"])
    (ids, labels), = encode_records(tiny_tokenizer, RECORDS[:1], cutoff=prompt_len + 2)[0]
    assert len(ids) == len(labels) == prompt_len + 2 and labels[prompt_len:] == ids[prompt_len:]
    assert encode_records(tiny_tokenizer, RECORDS[:1], cutoff=prompt_len) == ([], 1)


def test_data_sources_are_recognised(tiny_tokenizer, tmp_path, corpus):
    as_json = tmp_path / "alpaca.json"
    as_json.write_text(json.dumps(RECORDS))
    as_jsonl = tmp_path / "alpaca.jsonl"
    as_jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS))
    text_jsonl = tmp_path / "text.jsonl"
    text_jsonl.write_text("\n".join(json.dumps({"text": "some words " * 40}) for _ in range(5)))
    for source in (as_json, as_jsonl):
        examples, description = load_examples(tiny_tokenizer, str(source), 256)
        assert description["format"] == "instructions" and len(examples) == len(RECORDS)
        assert any(label == IGNORE_INDEX for label in examples[0][1])
    for source in (corpus, str(text_jsonl)):
        examples, description = load_examples(tiny_tokenizer, source, 64)
        assert description["format"] == "text"
        assert all(len(ids) == 64 and ids == labels for ids, labels in examples)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "no output"}]))
    with pytest.raises(LorapError, match="record 1 lacks"):
        load_examples(tiny_tokenizer, str(bad), 64)
    with pytest.raises(LorapError, match="not found"):
        load_examples(tiny_tokenizer, str(tmp_path / "missing.json"), 64)


def test_several_sources_are_pooled_and_each_is_counted(tiny_tokenizer, tmp_path, corpus):
    prose = tmp_path / "prose.txt"
    prose.write_text("a plain sentence of another kind. " * 200)
    instructions = tmp_path / "alpaca.json"
    instructions.write_text(json.dumps(RECORDS))
    alone = {source: load_examples(tiny_tokenizer, source, 256)[0] for source in (corpus, str(prose), str(instructions))}
    examples, description = load_examples(tiny_tokenizer, f"{corpus}+{prose}", 256)
    assert examples == alone[corpus] + alone[str(prose)]
    assert description["format"] == "text"
    assert [(part["source"], part["examples"]) for part in description["sources"]] == [
        (corpus, len(alone[corpus])), (str(prose), len(alone[str(prose)]))]
    examples, description = load_examples(tiny_tokenizer, f"{prose} + {instructions}", 256)
    assert len(examples) == len(alone[str(prose)]) + len(alone[str(instructions)])
    assert description["format"] == "instructions+text"
    data = prepare_data(tiny_tokenizer, f"{corpus}+{prose}", RecoveryConfig(cutoff=256, val_size=8))
    assert len(data.train) + len(data.validation) == len(alone[corpus]) + len(alone[str(prose)])
    named_with_a_plus = tmp_path / "a+b.txt"  # one file, not two sources
    named_with_a_plus.write_text("words " * 300)
    assert load_examples(tiny_tokenizer, str(named_with_a_plus), 64)[1]["format"] == "text"
    for bad in (f"{prose}+{prose}", f"{prose}+"):
        with pytest.raises(LorapError, match="name each pooled corpus once"):
            load_examples(tiny_tokenizer, bad, 64)
    with pytest.raises(LorapError, match="not found"):
        load_examples(tiny_tokenizer, f"{prose}+{tmp_path / 'missing.txt'}", 64)


def test_equal_mix_gives_each_pooled_source_the_same_share(tiny_tokenizer, tmp_path, corpus):
    small = tmp_path / "small.txt"  # numbered words: every window differs from every other
    small.write_text(" ".join(f"item{i} of the list" for i in range(200)))
    source = f"{corpus}+{small}"
    alone = [load_examples(tiny_tokenizer, part, 64)[0] for part in (corpus, str(small))]
    owner = {tuple(ids): index for index, examples in enumerate(alone) for ids, _ in examples}
    assert len(owner) == sum(map(len, alone)) and len(alone[0]) > 3 * len(alone[1])  # sizes differ a lot

    config = RecoveryConfig(cutoff=64, val_size=9)  # equal shares by default
    data = prepare_data(tiny_tokenizer, source, config)
    by_size = prepare_data(tiny_tokenizer, source, RecoveryConfig(cutoff=64, val_size=9, data_mix="size"))
    assert len(data.train) == len(by_size.train) and len(data.validation) == 9  # an epoch is as long as before
    shares = [sum(owner[tuple(ids)] == index for ids, _ in data.train) for index in (0, 1)]
    assert abs(shares[0] - shares[1]) <= 1
    held = [sum(owner[tuple(ids)] == index for ids, _ in data.validation) for index in (0, 1)]
    assert held == [5, 4]
    held_out = {tuple(ids) for ids, _ in data.validation}
    assert not held_out & {tuple(ids) for ids, _ in data.train}
    # The small source is repeated in whole passes, the large one sampled without repeats.
    small_train = [tuple(ids) for ids, _ in data.train if owner[tuple(ids)] == 1]
    large_train = [tuple(ids) for ids, _ in data.train if owner[tuple(ids)] == 0]
    assert len(set(small_train)) == len(alone[1]) - 4 and len(set(large_train)) == len(large_train)
    first, second = data.description["sources"]
    assert data.description["mix"] == "equal" and by_size.description["mix"] == "size"
    assert (first["train_share"], second["train_share"], first["held_out"]) == (shares[0], shares[1], 5)
    assert first["passes"] < 1 < second["passes"]
    # Sources alternate, so a prefix is balanced; and the split is seeded.
    assert [owner[tuple(ids)] for ids, _ in data.train[:6]] == [0, 1, 0, 1, 0, 1]
    assert prepare_data(tiny_tokenizer, source, config).train == data.train
    capped = prepare_data(tiny_tokenizer, source, RecoveryConfig(cutoff=64, val_size=9, data_mix="equal",
                                                                 max_examples=11))
    assert [part["train_share"] for part in capped.description["sources"]] == [6, 5] and len(capped.train) == 11
    alone_data = prepare_data(tiny_tokenizer, corpus, config)  # one source: the mix has nothing to share
    size_alone = prepare_data(tiny_tokenizer, corpus, RecoveryConfig(cutoff=64, val_size=9, data_mix="size"))
    assert (alone_data.train, alone_data.validation) == (size_alone.train, size_alone.validation)
    assert "mix" not in alone_data.description
    with pytest.raises(LorapError, match="too few for its 100 held out"):
        prepare_data(tiny_tokenizer, source, RecoveryConfig(cutoff=64, val_size=200, data_mix="equal"))
    with pytest.raises(LorapError, match="--data-mix must be one of equal, size"):
        RecoveryConfig(data_mix="even").validate()


def test_default_data_is_alpaca_online_and_wiki_offline(monkeypatch, tiny_tokenizer):
    from lorap.io import network

    monkeypatch.setattr(network, "hub_reachable", lambda: False)
    assert resolve_data(None) == "wiki" and resolve_data("x.txt") == "x.txt"
    with pytest.raises(LorapError, match="cannot be reached"):
        load_examples(tiny_tokenizer, "alpaca", 64)
    monkeypatch.setattr(network, "hub_reachable", lambda: True)
    assert resolve_data(None) == "alpaca"


def test_validation_split_is_held_out_and_seeded(tiny_tokenizer, corpus):
    config = RecoveryConfig(data=corpus, cutoff=64, val_size=8)
    first, again = prepare_data(tiny_tokenizer, corpus, config), prepare_data(tiny_tokenizer, corpus, config)
    assert first.validation == again.validation and len(first.validation) == 8
    train = {tuple(ids) for ids, _ in first.train}
    assert not any(tuple(ids) in train for ids, _ in first.validation)
    other = prepare_data(tiny_tokenizer, corpus, RecoveryConfig(cutoff=64, val_size=8, seed=1))
    assert other.validation != first.validation


def test_schedule_covers_every_example_once_per_epoch_with_warmup_and_decay():
    schedule = Schedule(train_examples=10, batch_size=2, grad_accum=2, epochs=2, max_steps=None, warmup=2, lr=1.0, seed=0)
    assert schedule.steps_per_epoch == 3 and schedule.total_steps == 6
    cache = {}
    for epoch in range(2):
        seen = [i for step in range(3 * epoch, 3 * epoch + 3) for mb in schedule.micro_batches(step, cache) for i in mb]
        assert sorted(seen) == list(range(10))
    assert schedule.epoch_order(0) != schedule.epoch_order(1)
    assert [schedule.lr_at(s) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert Schedule(10, 2, 2, 2, 4, None, 1.0, 0).total_steps == 4


def test_decay_steps_set_where_the_rate_reaches_zero_apart_from_where_training_stops():
    # Stopped at step 4 by --max-steps, decaying toward step 8: the rate is still half its peak at the end.
    later = Schedule(10, 2, 2, 2, max_steps=4, warmup=2, lr=1.0, seed=0, decay_steps=8)
    assert later.total_steps == 4 and later.horizon == 8
    assert [later.lr_at(s) for s in range(4)] == [0.5, 1.0, 1.0, 5 / 6]
    # Before the epochs end: training stops there, since every later step would train at rate 0.
    sooner = Schedule(10, 2, 2, 2, max_steps=None, warmup=2, lr=1.0, seed=0, decay_steps=4)
    assert sooner.total_steps == sooner.horizon == 4
    assert [sooner.lr_at(s) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    # Unset, the schedule is the one without the setting: decay ends at the last step.
    assert Schedule(10, 2, 2, 2, 4, 2, 1.0, 0).horizon == 4
    for bad in (0, -3, 2.5):
        with pytest.raises(LorapError, match="decay steps must be a positive integer"):
            RecoveryConfig(decay_steps=bad).validate()


def test_the_default_peak_rate_is_the_papers_for_lora_and_the_measured_one_for_full():
    from lorap.recover.config import FULL_LR, LORA_LR

    assert (LORA_LR, FULL_LR) == (1e-4, 2e-4)  # the paper's; docs/records/recovery.md's sweeps at 20% and 50%
    assert RecoveryConfig().lr == LORA_LR and RecoveryConfig(full=True).lr == FULL_LR
    assert RecoveryConfig(full=True, lr=5e-5).lr == 5e-5  # an explicit rate is kept
    assert RecoveryConfig(full=True).to_dict()["lr"] == FULL_LR  # the recorded settings hold the rate used


def test_a_time_budget_holds_the_rate_to_the_share_of_it_left():
    schedule = Schedule(400, 1, 1, 1, max_steps=None, warmup=None, lr=1.0, seed=0)  # 400 steps, warmup 40
    assert schedule.warmup_steps == 40
    assert schedule.lr_within_budget(100, elapsed_s=50, budget_s=100) == 0.5  # the step decay alone: 300/360
    assert schedule.lr_within_budget(100, elapsed_s=100, budget_s=100) == 0.0
    assert schedule.lr_within_budget(390, elapsed_s=10, budget_s=100) == schedule.lr_at(390)  # the steps end first
    # The default warmup ends after 40 steps or 10% of the budget, whichever comes first ...
    assert schedule.lr_within_budget(3, elapsed_s=5, budget_s=100) == 0.5
    assert schedule.lr_within_budget(3, elapsed_s=20, budget_s=100) == 0.8
    # ... and one the user set is kept.
    given = Schedule(400, 1, 1, 1, max_steps=None, warmup=40, lr=1.0, seed=0)
    assert given.lr_within_budget(3, elapsed_s=20, budget_s=100) == given.lr_at(3) == 0.1


def test_recovery_lowers_the_loss_keeps_the_count_and_reloads(compressed_dir, tmp_path, corpus, tiny_tokenizer):
    out = tmp_path / "recovered"
    result = recover(compressed_dir, out, data=corpus, max_steps=9, **FAST)
    report = result.report
    validation = report["history"]["validation"]
    assert [entry[0] for entry in validation] == [0, 3, 6, 9]
    assert report["best_validation_loss"] < report["validation_loss_before"] - 0.04
    train = [loss for _, loss in report["history"]["train"]]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3
    assert report["steps"] == 9 and report["stopped_by"] == "schedule"
    assert report["tokens_seen"] == 9 * 4 * 63  # 4 windows of 64 tokens a step, 63 predicted in each

    source_model, _ = api.load(compressed_dir)
    assert count_parameters(result.model) == count_parameters(source_model)
    reloaded, _ = api.load(out)
    assert count_parameters(reloaded) == count_parameters(source_model)
    assert {n: p.shape for n, p in reloaded.named_parameters()} == {n: p.shape for n, p in source_model.named_parameters()}
    config = json.loads((out / "config.json").read_text())
    recovery = config["lorap"]["recovery"]
    assert recovery["settings"]["lora_r"] == 8 and recovery["data"]["source"] == corpus
    assert recovery["best_step"] == report["best_step"] and config["lorap"]["layers"]
    assert (out / "compression_report.json").read_text() == (compressed_dir / "compression_report.json").read_text()
    assert not (tmp_path / ".recovered.recovery").exists()  # the finished run's work folder is cleaned up
    assert not (out / "adapter").exists()

    # The merged model changed the weights (so recovery did something) and reloads as saved.
    inputs = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        expected = result.model.eval()(inputs).logits
        assert (reloaded(inputs).logits - expected).abs().max() <= 1e-5
        assert (source_model(inputs).logits - expected).abs().max() > 1e-3
    # ... and in a separate process through plain transformers, with lorap not importable.
    assert_reloads_without_lorap(out, inputs, expected, tmp_path)


def test_each_evaluation_scores_held_out_examples_in_proportion_to_the_training_between_two():
    config = RecoveryConfig()  # batches of 4, an evaluation every 100 steps
    assert scored_count(config, 186, total_steps=3) == MIN_SCORED == 16  # a short run: the floor
    assert scored_count(config, 186, total_steps=40) == 40  # 160 examples trained between the two evaluations
    assert scored_count(config, 186, total_steps=5000) == 100  # 400 trained between any two
    assert scored_count(config, 50, total_steps=5000) == 50  # never more than are held out
    assert scored_count(RecoveryConfig(grad_accum=2, eval_every=10), 2000, total_steps=5000) == 20
    assert scored_count(RecoveryConfig(val_size=30), 30, total_steps=3) == 30  # --val-size: every one of them
    # A time budget caps one evaluation at a tenth of it, never below the floor or what is scored already.
    held_out = HeldOut([], 100, 4, 0, "cpu")
    held_out.fit_to_budget(budget_s=600, seconds_per_example=2.0, scored=4)
    assert held_out.count == 30
    held_out.fit_to_budget(budget_s=60, seconds_per_example=2.0, scored=4)
    assert held_out.count == MIN_SCORED
    held_out.fit_to_budget(budget_s=60, seconds_per_example=2.0, scored=20)
    assert held_out.count == MIN_SCORED  # it never grows back
    assert HeldOut([], 100, 4, 0, "cpu").count == 100


def test_a_budget_counts_the_command_from_its_start_and_the_evaluation_still_to_come():
    import time

    clock = Clock(elapsed_before=100.0, command_started=time.perf_counter() - 30.0)
    assert 130.0 <= clock.spent(still_to_come_s=0.0) < 131.0
    assert 145.0 <= clock.spent(still_to_come_s=15.0) < 146.0
    assert 100.0 <= clock.elapsed() < 101.0  # the work folder keeps training time, not loading


def _next_token_loss(model, examples, pad_id):
    """Mean next-token loss per predicted token, computed directly."""
    import torch.nn.functional as F

    total = tokens = 0
    with torch.no_grad():
        for start in range(0, len(examples), 4):
            ids, mask, labels = collate(examples[start : start + 4], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            tokens += int((targets != IGNORE_INDEX).sum())
    return total / tokens


def test_a_short_run_scores_a_small_held_out_set_and_says_how_many(compressed_dir, tmp_path, corpus, tiny_tokenizer):
    settings = {**FAST, "val_size": None, "cutoff": 32}  # short windows: more than 16 held out
    result = recover(compressed_dir, tmp_path / "out", data=corpus, max_steps=2, **settings)
    report = result.report
    held_out = report["data"]["validation_examples"]
    assert held_out > MIN_SCORED and report["validation_examples_scored"] == MIN_SCORED
    assert f"validation loss ({MIN_SCORED} held-out examples): " in format_recovery(report)
    # The loss before training is the source's on the first MIN_SCORED held-out examples, not on all of them.
    data = prepare_data(tiny_tokenizer, corpus, RecoveryConfig(cutoff=32))
    assert len(data.validation) == held_out
    source = api.load(compressed_dir, fuse=False)[0].eval()
    pad_id = tiny_tokenizer.pad_token_id if tiny_tokenizer.pad_token_id is not None else tiny_tokenizer.eos_token_id
    scored = _next_token_loss(source, data.validation[:MIN_SCORED], pad_id)
    everything = _next_token_loss(source, data.validation, pad_id)
    before = report["validation_loss_before"]
    assert abs(before - scored) <= 1e-6 * scored < abs(before - everything)


def test_a_time_budget_fits_the_held_out_count_and_a_resumption_keeps_it(compressed_dir, tmp_path, corpus):
    settings = {**FAST, "val_size": None, "eval_every": 18, "cutoff": 32}
    first = recover(compressed_dir, tmp_path / "out", data=corpus, max_steps=18, max_minutes=1e-6, **settings)
    assert first.report["data"]["validation_examples"] >= 18  # so the steps alone would score 18 (72 trained / 4)
    assert first.report["stopped_by"] == "max_minutes" and first.report["validation_examples_scored"] == MIN_SCORED
    resumed = recover(compressed_dir, tmp_path / "out", data=corpus, max_steps=18, resume=True, overwrite=True,
                      **settings)
    assert resumed.report["steps"] == 18 and resumed.report["validation_examples_scored"] == MIN_SCORED
    fresh = recover(compressed_dir, tmp_path / "fresh", data=corpus, max_steps=18, **settings)
    assert fresh.report["validation_examples_scored"] == 18


def test_activation_checkpointing_trains_exactly_as_without_it(compressed_dir, tmp_path, corpus, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    from torch.utils.checkpoint import checkpoint

    recomputed = []

    def counted(*args, **kwargs):
        recomputed.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counted)  # what gradient_checkpointing_enable binds
    settings = dict(data=corpus, max_steps=4, **{**FAST, "lora_dropout": 0.3})  # dropout: its RNG is replayed
    checkpointed = recover(compressed_dir, tmp_path / "checkpointed", **settings)
    assert recomputed  # the decoder layers ran under checkpointing
    monkeypatch.setattr(modeling_utils.PreTrainedModel, "gradient_checkpointing_enable", lambda self, **kwargs: None)
    plain = recover(compressed_dir, tmp_path / "plain", **settings)
    assert checkpointed.report["history"] == plain.report["history"]
    a, b = _weights(tmp_path / "checkpointed"), _weights(tmp_path / "plain")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(compressed_dir, tmp_path, corpus):
    settings = dict(data=corpus, max_steps=7, **FAST)
    recover(compressed_dir, tmp_path / "straight", **settings)

    class Crash(Exception):
        pass

    def crash_at_5(step, loss):  # a crash: steps since the last periodic checkpoint (4) are redone
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        recover(compressed_dir, tmp_path / "crashed", on_step=crash_at_5, **settings)
    assert not (tmp_path / "crashed").exists()  # never a half-written output
    with pytest.raises(LorapError, match="--resume"):
        recover(compressed_dir, tmp_path / "crashed", **settings)
    with pytest.raises(LorapError, match="lr differ"):
        recover(compressed_dir, tmp_path / "crashed", resume=True, **{**settings, "lr": 1e-3})
    recover(compressed_dir, tmp_path / "crashed", resume=True, **settings)

    def ctrl_c_at_3(step, loss):  # Ctrl-C: a checkpoint of this very step, so nothing is lost
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        recover(compressed_dir, tmp_path / "stopped", on_step=ctrl_c_at_3, **settings)
    state = json.loads((tmp_path / ".stopped.recovery" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    resumed = recover(compressed_dir, tmp_path / "stopped", resume=True, **settings)
    assert resumed.report["steps"] == 7

    straight = _weights(tmp_path / "straight")
    for name in ("crashed", "stopped"):
        other = _weights(tmp_path / name)
        assert straight.keys() == other.keys()
        assert all(torch.equal(straight[k], other[k]) for k in straight), name


def test_time_budget_stops_early_keeps_the_work_and_resume_continues(compressed_dir, tmp_path, corpus):
    settings = dict(data=corpus, max_steps=6, **FAST)
    first = recover(compressed_dir, tmp_path / "out", max_minutes=1e-6, **settings)
    assert first.report["stopped_by"] == "max_minutes" and first.report["steps"] == 1
    assert first.report["learning_rate"] == {"peak": 2e-2, "warmup_steps": 0, "decay_ends_at_step": 6,
                                             "with_time_budget": False, "last": 2e-2}
    assert "decaying to zero at step 6; 0.02 at the last step" in format_recovery(first.report)
    # With --budget-decay the budget was spent (by the held-out loss before training) before the step:
    # it trained at rate 0.
    shaped = recover(compressed_dir, tmp_path / "shaped", max_minutes=1e-6, budget_decay=True, **settings)
    assert shaped.report["learning_rate"]["last"] == 0.0 and shaped.report["learning_rate"]["with_time_budget"]
    assert "decaying to zero at step 6 or as the 1e-06-minute budget runs out" in format_recovery(shaped.report)
    assert first.report["history"]["validation"][-1][0] == 1  # the last step is validated before stopping
    assert (tmp_path / ".out.recovery" / "checkpoint").is_dir() and (tmp_path / "out" / "config.json").is_file()
    second = recover(compressed_dir, tmp_path / "out", resume=True, overwrite=True, **settings)
    assert second.report["steps"] == 6 and second.report["stopped_by"] == "schedule"
    assert not (tmp_path / ".out.recovery").exists()


def test_a_run_started_before_data_mix_resumes_as_pooled_by_size(compressed_dir, tmp_path, corpus):
    notes = tmp_path / "notes.txt"
    notes.write_text(" ".join(f"note {i} of the list" for i in range(200)))
    settings = dict(data=f"{corpus}+{notes}", max_steps=3, **FAST)
    recover(compressed_dir, tmp_path / "out", max_minutes=1e-6, data_mix="size", **settings)
    run_file = tmp_path / ".out.recovery" / "run.json"
    run = json.loads(run_file.read_text())
    for newer in ("data_mix", "decay_steps", "budget_decay"):  # what a version before --data-mix wrote
        del run["settings"][newer]
    run_file.write_text(json.dumps(run))
    with pytest.raises(LorapError, match="add --data-mix size"):
        recover(compressed_dir, tmp_path / "out", resume=True, overwrite=True, **settings)  # equal by default
    resumed = recover(compressed_dir, tmp_path / "out", resume=True, overwrite=True, data_mix="size", **settings)
    assert resumed.report["steps"] == 3
    # With one source the mix changes nothing, so it is not part of what a resumption must match.
    recover(compressed_dir, tmp_path / "single", max_minutes=1e-6, data=corpus, max_steps=3, **FAST)
    assert "data_mix" not in json.loads((tmp_path / ".single.recovery" / "run.json").read_text())["settings"]
    assert recover(compressed_dir, tmp_path / "single", resume=True, overwrite=True, data=corpus, max_steps=3,
                   data_mix="size", **FAST).report["steps"] == 3


def test_a_full_run_started_at_the_old_default_rate_is_told_which_rate_to_resume_with(compressed_dir, tmp_path,
                                                                                         corpus):
    settings = dict(data=corpus, max_steps=3, full=True, **{k: v for k, v in FAST.items() if k != "lr"})
    recover(compressed_dir, tmp_path / "out", max_minutes=1e-6, lr=1e-4, **settings)  # what --full did before
    with pytest.raises(LorapError, match="lr differ; it was started with lr=0.0001"):
        recover(compressed_dir, tmp_path / "out", resume=True, overwrite=True, **settings)  # now 2e-4 by default
    resumed = recover(compressed_dir, tmp_path / "out", resume=True, overwrite=True, lr=1e-4, **settings)
    assert resumed.report["steps"] == 3 and resumed.report["learning_rate"]["peak"] == 1e-4


def test_instruction_recovery_keeps_the_adapter(compressed_dir, tmp_path):
    from peft import PeftModel

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(RECORDS))
    out = tmp_path / "out"
    result = recover(compressed_dir, out, data=str(data), max_steps=3, keep_adapter=True, **{**FAST, "cutoff": 256})
    assert result.report["data"]["format"] == "instructions"
    assert (out / "adapter" / "adapter_config.json").is_file()
    base, _ = api.load(compressed_dir)
    wrapped = PeftModel.from_pretrained(base, out / "adapter").eval()
    inputs = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        assert (wrapped(inputs).logits - result.model(inputs).logits).abs().max() <= 1e-5


def test_cli_recover(compressed_dir, tmp_path, corpus, capsys):
    from lorap.cli import main

    out = tmp_path / "cli"
    notes = tmp_path / "notes.txt"
    notes.write_text(" ".join(f"note {i} of the list" for i in range(200)))
    code = main([
        "recover", str(compressed_dir), "--out", str(out), "--data", f"{corpus}+{notes}",  # equal shares by default
        "--max-steps", "2", "--decay-steps", "50", "--budget-decay", "--cutoff", "64", "--val-size", "4", "--lora-r", "4",
        "--no-progress",
    ])
    assert code == 0
    recovery = json.loads((out / "config.json").read_text())["lorap"]["recovery"]
    assert recovery["settings"]["lora_r"] == 4 and recovery["settings"]["data_mix"] == "equal"
    assert recovery["settings"]["decay_steps"] == 50 and recovery["settings"]["budget_decay"] and recovery["steps"] == 2
    printed = capsys.readouterr().out
    assert "validation loss" in printed
    shares = [part["train_share"] for part in recovery["data"]["sources"]]
    assert f"equal shares: {corpus} {shares[0]} (" in printed and abs(shares[0] - shares[1]) <= 1
    with pytest.raises(SystemExit):
        main(["recover", str(compressed_dir), "--out", str(tmp_path / "x"), "--data-mix", "even"])
    assert "invalid choice: 'even'" in capsys.readouterr().err
    assert main(["recover", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a lorap checkpoint" in capsys.readouterr().err
    assert main(["recover", str(compressed_dir), "--out", str(out), "--data", corpus, "--max-steps", "2"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_bad_settings_are_refused(compressed_dir, tmp_path):
    for bad in ({"lora_r": 0}, {"max_steps": 0}, {"lr": 0.0}, {"lora_dropout": 1.0}, {"max_minutes": -1}):
        with pytest.raises(LorapError):
            recover(compressed_dir, tmp_path / "out", **bad)


def test_half_precision_checkpoint_stays_half_and_a_work_dir_keeps_foreign_files(tmp_path, tiny_tokenizer, corpus):
    dense = tmp_path / "dense"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer)).to(torch.bfloat16).save_pretrained(dense)
    tiny_tokenizer.save_pretrained(dense)
    api.compress(str(dense), tmp_path / "compressed", ratio=0.5, progress=False, **SMALL)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("not lorap's")
    recover(tmp_path / "compressed", tmp_path / "out", data=corpus, max_steps=2, work_dir=work, **FAST)
    reloaded, _ = api.load(tmp_path / "out")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert count_parameters(reloaded) == count_parameters(api.load(tmp_path / "compressed")[0])
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
