"""How low-rank is each projection? Singular-value spectra, plain and activation-weighted.

LoRAP's premise is that attention weights are far closer to low rank than FFN weights, so
attention is factorized and the FFN is pruned. This module measures that on a real model:
for every q, k, v, o, gate, up and down matrix W (shape [out, in]) it takes the singular
values of W and of W diag(s), where s_j = sqrt(sum of x_j^2 / n_sequences) over calibration
tokens of that linear's input (the statistic AWSVD uses), and reports the low-rank degree:
the fraction of the full rank min(out, in) needed to keep a share (default 90%) of the
spectral energy sum(sigma^2). Lower means more low-rank.
"""

import torch

from ..architectures import Architecture
from ..families import ATTENTION_PROJECTIONS as ATTENTION
from ..families import FFN_PROJECTIONS as FFN
from ..families import PROJECTIONS, SHARED_INPUTS
from ..errors import LorapError
from ..log import info

VARIANTS = ("plain", "weighted")
# "Far more low-rank": attention needs at most this share of the FFN's rank fraction.
CLEARLY_LOWER = 0.8
OUTPUT_PREFIX = "lowrank_"


def projections(model) -> dict:
    """{(layer, projection name): module} for every decoder layer (through the family's adapter)."""
    architecture = Architecture(model.config)
    return {
        (index, name): architecture.projection(layer, name)
        for index, layer in enumerate(architecture.decoder_layers(model))
        for name in PROJECTIONS
    }


def effective_weight(module) -> torch.Tensor:
    """The [out, in] matrix a projection applies: a dense weight, or left @ right of a factorized pair."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().float()
    if hasattr(module, "left") and hasattr(module, "right"):
        return (module.left.weight.detach().float() @ module.right.weight.detach().float())
    raise LorapError(f"cannot read a weight matrix from {type(module).__name__}")


@torch.no_grad()
def input_norms(model, batches: torch.Tensor, batch_size: int = 8) -> dict:
    """{(layer, name): s} with s_j = sqrt(sum over calibration tokens of x_j^2 / n_sequences)."""
    architecture = Architecture(model.config)
    modules = {
        (index, source): module
        for index, layer in enumerate(architecture.decoder_layers(model))
        for source, module in architecture.input_modules(layer).items()
    }
    sums: dict = {}

    def hook_for(key):
        def hook(module, args):
            x = args[0].detach()
            squares = x.double().pow(2).reshape(-1, x.shape[-1]).sum(0)  # float64: sums over many tokens
            sums[key] = squares if key not in sums else sums[key] + squares

        return hook

    handles = [module.register_forward_pre_hook(hook_for(key)) for key, module in modules.items()]
    device = next(model.parameters()).device
    try:
        for start in range(0, batches.shape[0], batch_size):
            model(input_ids=batches[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {
        (index, name): (sums[(index, source)] / batches.shape[0]).sqrt().float()
        for (index, source) in modules
        for name in SHARED_INPUTS[source]
    }


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total."""
    squares = singular_values.double().pow(2)
    cumulative = squares.cumsum(0) / squares.sum()
    return int(torch.searchsorted(cumulative, torch.tensor([energy], dtype=torch.float64)).item()) + 1


def _degree(singular_values: torch.Tensor, shape: tuple, energy: float) -> dict:
    out_features, in_features = shape
    rank = min(rank_for_energy(singular_values, energy), len(singular_values))
    full = min(shape)
    return {
        "rank": rank,
        "fraction": rank / full,
        # The parameters a rank-k factorization keeping that energy would need, relative to dense.
        "parameter_fraction": rank * (in_features + out_features) / (in_features * out_features),
    }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def analyze_model(model, tokenizer, calibration: str = "wiki", samples: int = 16, seqlen: int = 128,
                  energy: float = 0.9, seed: int = 0, batch_size: int = 8) -> dict:
    """Spectra and low-rank degrees of every projection; the dict `lorap analyze` writes as JSON."""
    from ..io.data import calibration_samples

    if not 0 < energy < 1:
        raise LorapError(f"energy must be a fraction in (0, 1), got {energy}")
    batches = calibration_samples(tokenizer, calibration, samples, seqlen, seed)
    info(f"collecting input statistics over {samples} x {seqlen} {calibration} train tokens")
    norms = input_norms(model, batches, batch_size)
    info("computing singular values of every projection (plain and activation-weighted)")
    matrices, curves = [], {name: {v: [] for v in VARIANTS} for name in PROJECTIONS}
    for (layer, name), module in projections(model).items():
        weight = effective_weight(module)
        row = {"layer": layer, "projection": name, "shape": list(weight.shape)}
        weighted = weight * norms[(layer, name)].to(weight.device)  # W diag(s): column j scaled by s_j
        for variant, matrix in (("plain", weight), ("weighted", weighted)):
            values = torch.linalg.svdvals(matrix).cpu()
            row[variant] = _degree(values, tuple(weight.shape), energy)
            curves[name][variant].append(values)
        matrices.append(row)
    return {
        "energy": energy,
        "calibration": {"source": calibration, "split": "train", "samples": samples, "seqlen": seqlen, "seed": seed},
        "matrices": matrices,
        "by_projection": _by_projection(matrices),
        "groups": _groups(matrices),
        "spectra": _mean_spectra(curves),
    }


def _by_projection(matrices: list[dict]) -> dict:
    summary = {}
    for name in PROJECTIONS:
        rows = [m for m in matrices if m["projection"] == name]
        summary[name] = {"shape": rows[0]["shape"]}
        for variant in VARIANTS:
            fractions = [m[variant]["fraction"] for m in rows]
            summary[name][variant] = {
                "mean_fraction": _mean(fractions),
                "min_fraction": min(fractions),
                "max_fraction": max(fractions),
                "mean_parameter_fraction": _mean(m[variant]["parameter_fraction"] for m in rows),
            }
    return summary


def _groups(matrices: list[dict]) -> dict:
    groups = {}
    for group, names in (("attention", ATTENTION), ("ffn", FFN)):
        rows = [m for m in matrices if m["projection"] in names]
        groups[group] = {
            variant: {
                "mean_fraction": _mean(m[variant]["fraction"] for m in rows),
                "mean_parameter_fraction": _mean(m[variant]["parameter_fraction"] for m in rows),
            }
            for variant in VARIANTS
        }
    return groups


def _mean_spectra(curves: dict) -> dict:
    """Per projection type: singular values over sigma_0, averaged over layers (all layers share a shape)."""
    result = {}
    for name, by_variant in curves.items():
        result[name] = {}
        for variant, spectra in by_variant.items():
            normalized = torch.stack([s / s[0] for s in spectra])
            energy = torch.stack([(s.double() ** 2).cumsum(0) / (s.double() ** 2).sum() for s in spectra])
            result[name][variant] = {
                "normalized_singular_values": [round(float(v), 6) for v in normalized.mean(0)],
                "cumulative_energy": [round(float(v), 6) for v in energy.mean(0)],
            }
    return result


def finding(result: dict) -> dict:
    """Does this model show the paper's observation? Answered from the numbers, either way."""
    verdicts = {}
    for variant in VARIANTS:
        attention = result["groups"]["attention"][variant]["mean_fraction"]
        ffn = result["groups"]["ffn"][variant]["mean_fraction"]
        ratio = attention / ffn
        if ratio <= CLEARLY_LOWER:
            verdict = "shown"
        elif ratio < 1:
            verdict = "weakly shown (attention only slightly more low-rank)"
        else:
            verdict = "not shown (attention is not more low-rank than the FFN)"
        verdicts[variant] = {
            "verdict": verdict,
            "attention_mean_fraction": attention,
            "ffn_mean_fraction": ffn,
            "ratio": ratio,
            "sentence": (
                f"{variant}: keeping {result['energy']:.0%} of the spectral energy needs on average "
                f"{attention:.1%} of the full rank for attention matrices and {ffn:.1%} for FFN matrices "
                f"(ratio {ratio:.2f}): {verdict}."
            ),
        }
    return verdicts
