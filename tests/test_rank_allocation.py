"""Adaptive ranks: the greedy allocation against brute force, its limits, and a run that uses it
(in memory and streamed, the same bytes)."""
import itertools

import pytest
import torch

from conftest import build_tiny_model
from lorap import api
from lorap.methods.presets import config_for
from lorap.methods.rank_allocation import layer_ranks
from lorap.pipeline.run import compress_model
from test_compress import SMALL
from test_streaming import _assert_same_checkpoints, sharded_model_dir  # noqa: F401  (a fixture)


def test_ranks_follow_the_spectra_within_the_budget_and_the_alignment():
    spectra = {"q_proj": torch.tensor([9.0, 8.0, 7.0, 6.0, 0.1, 0.1]), "k_proj": torch.tensor([5.0, 1.0, 0.5, 0.1, 0.1, 0.1])}
    shapes = {"q_proj": (12, 12), "k_proj": (6, 12)}
    budget = 4 * 24 + 2 * 18  # what a rule giving q 4 and k 2 would spend
    ranks = layer_ranks(spectra, shapes, budget)
    assert ranks == {"q_proj": 4, "k_proj": 2} or sum(ranks[n] * sum(shapes[n]) for n in ranks) <= budget
    flat_k = {**spectra, "k_proj": torch.tensor([0.01] * 6)}
    rule_budget = 3 * 24 + 3 * 18  # a rule giving both rank 3
    assert layer_ranks(flat_k, shapes, rule_budget) == {"q_proj": 4, "k_proj": 1}  # a flat spectrum gives its budget away
    assert layer_ranks(flat_k, shapes, 10 * 24) == {"q_proj": 5, "k_proj": 3}  # never as large as the matrix
    aligned = layer_ranks(flat_k, shapes, budget, align=2)
    assert all(rank % 2 == 0 and rank >= 2 for rank in aligned.values())
    assert sum(aligned[n] * sum(shapes[n]) for n in aligned) <= budget


def test_greedy_allocation_is_optimal_on_small_cases():
    generator = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (10, 10), "k_proj": (5, 10), "v_proj": (5, 10)}
    for _ in range(20):
        spectra = {n: torch.rand(5, generator=generator).sort(descending=True).values * torch.rand(1, generator=generator)
                   for n in shapes}
        budget = int(torch.randint(50, 150, (1,), generator=generator))
        chosen = layer_ranks(spectra, shapes, budget)

        def kept(ranks):
            return sum(float(spectra[n][:r].pow(2).sum()) for n, r in ranks.items())

        caps = {n: max(r for r in range(1, 5) if r * sum(shapes[n]) < shapes[n][0] * shapes[n][1]) for n in shapes}
        feasible = [dict(zip(shapes, combo)) for combo in itertools.product(*(range(1, caps[n] + 1) for n in shapes))
                    if sum(r * sum(shapes[n]) for r, n in zip(combo, shapes)) <= budget]
        if not feasible:
            continue
        best = max(kept(ranks) for ranks in feasible)
        assert sum(chosen[n] * sum(shapes[n]) for n in shapes) <= budget
        # greedy by value per weight: optimal up to the last unit that did not fit
        assert kept(chosen) >= best - max(float(s.max() ** 2) for s in spectra.values()) - 1e-9


def test_a_run_with_adaptive_ranks_moves_rank_and_keeps_the_budget(tiny_tokenizer):
    model = build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer), num_hidden_layers=3)
    rule = compress_model(build_tiny_model("llama_gqa", vocab_size=len(tiny_tokenizer), num_hidden_layers=3),
                          tiny_tokenizer, config_for("paper", ratio=0.4, **SMALL), progress=False).plan
    adaptive = compress_model(model, tiny_tokenizer, config_for("paper", ratio=0.4, rank_allocation="adaptive", **SMALL),
                              progress=False).plan
    assert [layer.ranks for layer in adaptive.layers] != [layer.ranks for layer in rule.layers]
    for a, r in zip(adaptive.layers, rule.layers):
        assert {n for n, k in a.ranks.items() if k is None} == {n for n, k in r.ranks.items() if k is None}
    # the same budget: never more than the rule's count, less by under one rank block per layer
    assert 0 <= rule.compressed_parameters - adaptive.compressed_parameters < 0.002 * rule.dense_parameters
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 500, (2, 8))).logits).all()


@pytest.mark.parametrize("sharded_model_dir", [("llama_gqa", False)], indirect=True)
def test_adaptive_ranks_stream_to_the_in_memory_checkpoint(sharded_model_dir, tmp_path):
    settings = dict(ratio=0.4, preset="best", rank_allocation="adaptive", **SMALL)
    in_memory = api.compress(str(sharded_model_dir), tmp_path / "mem", progress=False, **settings)
    streamed = api.compress(str(sharded_model_dir), tmp_path / "str", progress=False, stream=True, **settings)
    assert streamed.report["plan"] == in_memory.report["plan"]
    _assert_same_checkpoints(tmp_path / "mem", tmp_path / "str")
    assert "rank_scoring" in streamed.report["peak_rss_mb_by_phase"]
