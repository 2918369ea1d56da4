"""benchmarks/align_choice.py's comparison, which sets the multiple of --align auto per device: a
multiple is judged against its neighbours, so times that do not depend on the width (a GPU bound by
kernel launches) or that grow evenly with it favour no N, and kernels that pad widths to a tile
favour the tile's multiples."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import align_choice  # noqa: E402


@pytest.mark.parametrize("times", [
    {w: 1.0 for w in range(64, 192)},  # flat: the old comparison per unit of width favoured 128 here
    {w: 0.1 + 0.01 * w for w in range(1152, 1280)},  # evenly growing
])
def test_times_that_ignore_tiles_favour_no_multiple(times):
    gains = align_choice.gains(times)
    assert gains[1] == 1.0 and all(gain == pytest.approx(1.0, abs=0.01) for gain in gains.values())


def test_padding_to_a_tile_favours_its_multiples_and_the_rule_picks_the_tile():
    times = {w: -(-w // 64) * 64 * 1e-3 for w in range(1152, 1280)}  # every width padded to a multiple of 64
    gains = align_choice.gains(times)
    assert gains[64] > gains[32] > 1.0
    assert 128 not in gains  # no multiple of 128 inside the row with neighbours on both sides
    assert align_choice.choose([gains]) == 64


def test_the_mean_leaves_out_a_multiple_some_row_could_not_measure():
    rows = [{1: 1.0, 8: 1.2, 128: 3.0}, {1: 1.0, 8: 1.1}]
    assert align_choice.mean_gains(rows) == {1: 1.0, 8: pytest.approx(1.15)}
    assert align_choice.choose(rows) == 8
