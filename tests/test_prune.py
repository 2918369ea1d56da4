"""FFN channel scores and the 1% rule."""
import torch
from torch import nn

from lorap.prune import channel_scores, kept_channels, prune_ffn


class GatedFFN(nn.Module):
    def __init__(self, hidden=8, width=200):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_one_percent_rule_on_a_constructed_case():
    width = 200
    scores = torch.randperm(width).float()  # channel c has score scores[c]; all distinct
    ranked = torch.argsort(scores)
    keep = kept_channels(scores, kept_width=width - 60, bottom_keep=0.01)
    kept = set(keep.tolist())
    assert len(kept) == 140
    assert set(ranked[:2].tolist()) <= kept  # the lowest 1% (2 channels) survive
    assert not (set(ranked[2:62].tolist()) & kept)  # the next 30% are gone
    assert set(ranked[62:].tolist()) <= kept  # the rest survive
    assert torch.equal(keep, torch.sort(keep).values)  # original order kept


def test_without_bottom_keep_the_lowest_go():
    scores = torch.arange(100.0).flip(0)
    keep = kept_channels(scores, kept_width=90, bottom_keep=0.0)
    assert set(keep.tolist()) == set(range(90))


def test_channel_score_definition():
    torch.manual_seed(0)
    ffn = GatedFFN()
    stats = {"gate_proj": torch.rand(8), "up_proj": torch.rand(8), "down_proj": torch.rand(200)}
    scores = channel_scores(ffn, stats)
    c = 17
    expected = (
        (ffn.up_proj.weight[c].abs() * stats["up_proj"]).norm()
        + (ffn.gate_proj.weight[c].abs() * stats["gate_proj"]).norm()
        + (ffn.down_proj.weight[:, c].abs() * stats["down_proj"][c]).norm()
    )
    assert torch.isclose(scores[c], expected)


def test_pruning_removes_exactly_the_channels():
    torch.manual_seed(0)
    ffn = GatedFFN()
    x = torch.randn(4, 8)
    keep = torch.arange(0, 200, 2)
    # Reference: zero the dropped channels' contribution in the dense FFN.
    mask = torch.zeros(200)
    mask[keep] = 1
    expected = ffn.down_proj(nn.functional.silu(ffn.gate_proj(x)) * ffn.up_proj(x) * mask)
    prune_ffn(ffn, keep)
    assert ffn.gate_proj.weight.shape == (100, 8) and ffn.down_proj.weight.shape == (8, 100)
    assert torch.allclose(ffn(x), expected, atol=1e-6)
