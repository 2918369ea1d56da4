"""Full fine-tuning and distillation in recovery: the chunked loss against a direct computation,
what trains and what stays frozen, the teacher checks, the memory check, bit-exact resumption."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model
from lorap import api
from lorap.errors import LorapError
from lorap.plan.counting import count_parameters
from lorap.recover import heldout as heldout_module
from lorap.recover import objective as objective_module
from lorap.recover.heldout import HeldOut
from lorap.recover.objective import Objective
from lorap.recover.run import recover
from test_compress import assert_reloads_without_lorap
from test_recover import FAST, _compressed, corpus  # noqa: F401  (corpus is a fixture)


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, tiny_tokenizer):
    return _compressed("llama_gqa", tmp_path_factory.mktemp("distill-llama"), tiny_tokenizer)


def _batch(vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 20), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0  # a padded row
    labels = ids.clone()
    labels[2, 15:] = -100
    labels[0, :5] = -100  # an instruction prompt
    return ids, mask, labels


def _direct(student, teacher, batch, kd_weight, temperature):
    """The same loss computed the plain way: whole logits, no chunks."""
    ids, mask, labels = batch
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    nll = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()[keep]
    p = F.softmax(teacher_logits / temperature, -1)
    kd = (p * (p.log() - F.log_softmax(logits[keep] / temperature, -1))).sum() * temperature**2
    return (1 - kd_weight) * nll + kd_weight * kd, nll, kd


def test_chunked_loss_and_gradient_equal_the_direct_computation(monkeypatch):
    student, teacher = build_tiny_model("llama_gqa", seed=0), build_tiny_model("llama_gqa", seed=1).eval()
    batch = _batch(student.config.vocab_size)
    monkeypatch.setattr(objective_module, "LOGITS_BYTES_AT_ONCE", 4 * student.config.vocab_size * 7)  # chunks of 16
    terms = Objective(student, teacher, kd_weight=0.7, temperature=2.0)(batch, "cpu")
    total, nll, kd = _direct(student, teacher, batch, 0.7, 2.0)
    assert terms.tokens == int((batch[2][:, 1:] != -100).sum()) > 16  # several chunks
    torch.testing.assert_close(terms.total, total, rtol=1e-5, atol=1e-4)
    assert terms.nll == pytest.approx(float(nll.detach()), rel=1e-5) and terms.kd == pytest.approx(float(kd), rel=1e-5)
    terms.total.backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    total.backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-4, atol=1e-6)


def test_a_student_equal_to_its_teacher_has_no_distillation_loss_and_no_teacher_means_next_token():
    model = build_tiny_model("llama_gqa")
    batch = _batch(model.config.vocab_size, seed=3)
    same = Objective(model, build_tiny_model("llama_gqa").eval(), kd_weight=1.0, temperature=1.5, hidden_weight=1.0)(batch, "cpu")
    assert abs(same.kd) < 1e-3 and abs(same.hidden) < 1e-8 and float(same.total) == pytest.approx(same.kd, abs=1e-6)
    plain = Objective(model)(batch, "cpu")
    assert float(plain.total) == pytest.approx(plain.nll) and plain.kd == 0.0
    _, nll, _ = _direct(model, model, batch, 0.0, 1.0)
    assert plain.nll == pytest.approx(float(nll), rel=1e-5)


def test_held_out_scoring_runs_the_teacher_once_and_scores_as_without_its_cache(monkeypatch):
    student, teacher = build_tiny_model("llama_gqa", seed=0), build_tiny_model("llama_gqa", seed=1).eval()
    ids = torch.randint(0, student.config.vocab_size, (12, 20), generator=torch.Generator().manual_seed(5)).tolist()
    examples = [(row[: 12 + i % 8], row[: 12 + i % 8]) for i, row in enumerate(ids)]  # padded batches too
    teacher_runs = []
    teacher.get_decoder().register_forward_hook(lambda *args: teacher_runs.append(1))
    objective = Objective(student, teacher, kd_weight=0.7, temperature=2.0, hidden_weight=0.5)
    held_out = HeldOut(examples, 10, 4, 0, "cpu")  # the first 10 of 12: batches of 4, 4 and 2
    first = held_out.score(objective)
    assert len(teacher_runs) == 3
    assert held_out.score(objective) == first and len(teacher_runs) == 3  # the teacher ran once per batch
    monkeypatch.setattr(heldout_module, "TEACHER_CACHE_BYTES", 0)
    assert HeldOut(examples, 10, 4, 0, "cpu").score(objective) == first and len(teacher_runs) == 6
    # ... and what it scores is the objective's mean over the first 10 examples' predicted tokens.
    from lorap.recover.data import collate

    total = tokens = 0
    with torch.no_grad():
        for batch in (collate(examples[:4], 0), collate(examples[4:8], 0), collate(examples[8:10], 0)):
            terms = objective(batch, "cpu")
            total, tokens = total + float(terms.total.double()), tokens + terms.tokens
    assert first[0] == pytest.approx(total / tokens, rel=1e-12)
    assert HeldOut(examples, 12, 4, 0, "cpu").score(objective)[0] != pytest.approx(first[0], rel=1e-6)


def test_full_distillation_from_the_base_model_trains_every_compressed_weight_and_no_embedding(compressed_dir, tmp_path, corpus):
    out = tmp_path / "full"
    result = recover(compressed_dir, out, data=corpus, max_steps=6, full=True, teacher="base", kd_weight=0.5,
                     kd_temperature=2.0, **{**FAST, "lr": 2e-3})
    report = result.report
    assert report["method"] == "full" and "lora" not in report
    assert report["loss"]["distillation"] == 0.5 and report["loss"]["next_token"] == 0.5
    assert report["loss"]["teacher"].endswith(str(compressed_dir.parent / "dense") + ")")
    assert report["best_validation_loss"] < report["validation_loss_before"]
    assert report["best_validation_nll"] < report["validation_nll_before"]
    source, _ = api.load(compressed_dir, fuse=False)
    source_state, new_state = source.state_dict(), result.model.state_dict()
    assert source_state.keys() == new_state.keys()
    changed = {name for name in source_state if not torch.equal(source_state[name], new_state[name])}
    frozen = {name for name in source_state if "embed_tokens" in name or "lm_head" in name}
    assert frozen and not changed & frozen
    assert any(".right." in name for name in changed) and any(".left." in name for name in changed)
    assert any("gate_proj" in name for name in changed) and any("norm" in name for name in changed)
    assert count_parameters(result.model) == count_parameters(source)
    config = json.loads((out / "config.json").read_text())
    assert config["lorap"]["recovery"]["method"] == "full"
    inputs = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        expected = api.load(out)[0](inputs).logits
    assert_reloads_without_lorap(out, inputs, expected, tmp_path)


def test_lora_with_distillation_and_layer_outputs_lowers_its_loss(compressed_dir, tmp_path, corpus):
    result = recover(compressed_dir, tmp_path / "lora-kd", data=corpus, max_steps=6, teacher="base",
                     kd_hidden_weight=0.5, **{**FAST, "lr": 3e-3})
    report = result.report
    assert report["method"] == "lora" and report["loss"]["layer_outputs"] == 0.5
    assert report["best_validation_loss"] < report["validation_loss_before"]


def test_full_interrupted_and_resumed_equals_an_uninterrupted_run(compressed_dir, tmp_path, corpus):
    settings = dict(data=corpus, max_steps=5, full=True, teacher="base", **{**FAST, "lr": 2e-3})
    straight = recover(compressed_dir, tmp_path / "straight", **settings)

    class Crash(Exception):
        pass

    def crash_at_3(step, loss):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        recover(compressed_dir, tmp_path / "crashed", on_step=crash_at_3, **settings)
    resumed = recover(compressed_dir, tmp_path / "crashed", resume=True, **settings)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_teachers_and_settings_are_refused_before_training(compressed_dir, tmp_path, tiny_tokenizer, corpus, monkeypatch):
    other = tmp_path / "other-vocab"
    build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer) + 8).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    steps = []
    common = dict(data=corpus, max_steps=2, on_step=lambda step, loss: steps.append(step), **FAST)
    with pytest.raises(LorapError, match="same tokenizer"):
        recover(compressed_dir, tmp_path / "out", teacher=str(other), **common)
    with pytest.raises(LorapError):
        recover(compressed_dir, tmp_path / "out", teacher=str(tmp_path / "missing"), **common)
    for bad, message in (({"teacher": "base", "kd_weight": 1.5}, r"\[0, 1\]"),
                         ({"teacher": "base", "kd_temperature": 0.0}, "positive"),
                         ({"kd_weight": 0.5}, "need a teacher"),
                         ({"train_embeddings": True}, "needs --full"),
                         ({"full": True, "keep_adapter": True}, "drop one")):
        with pytest.raises(LorapError, match=message):
            recover(compressed_dir, tmp_path / "out", **{**common, **bad})
    monkeypatch.setattr("lorap.devices.available_memory_bytes", lambda: 2**20)
    with pytest.raises(LorapError, match="Use LoRA instead"):
        recover(compressed_dir, tmp_path / "out", full=True, **common)
    assert steps == [] and not (tmp_path / "out").exists()


def test_cli_full_distillation(compressed_dir, tmp_path, corpus, capsys):
    from lorap.cli import main

    out = tmp_path / "cli"
    code = main(["recover", str(compressed_dir), "--out", str(out), "--data", corpus, "--max-steps", "2",
                 "--cutoff", "64", "--val-size", "4", "--full", "--teacher", "base", "--kd-weight", "0.8",
                 "--kd-temperature", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "full (every weight but the embeddings and LM head)" in printed and "0.8 x distillation (T 2)" in printed
    assert "held-out next-token loss" in printed
    assert "learning rate: peak 0.0002" in printed  # --full without --lr: the default rate of full fine-tuning
    assert main(["recover", str(compressed_dir), "--out", str(tmp_path / "x"), "--kd-weight", "2",
                 "--teacher", "base"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_a_dense_model_is_fine_tuned_the_same_way_as_a_control(compressed_dir, tmp_path, corpus):
    dense = compressed_dir.parent / "dense"
    result = recover(dense, tmp_path / "control", data=corpus, max_steps=3, full=True, **{**FAST, "lr": 2e-3})
    assert result.report["method"] == "full" and result.report["steps"] == 3
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "control")
    assert count_parameters(plain) == count_parameters(AutoModelForCausalLM.from_pretrained(dense))
    assert not hasattr(plain.config, "lorap")
    with pytest.raises(LorapError, match="no base model"):
        recover(dense, tmp_path / "x", data=corpus, max_steps=1, teacher="base", **FAST)
