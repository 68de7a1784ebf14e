"""How coarse maps reach the input size (`to_input_size`, `Model.map_border`): no position is favoured, and
folders saved before the key keep the maps their thresholds were calibrated on."""

import pytest
import torch
import torch.nn.functional as F

from uadkit.models.base import _kernel, to_input_size, topk_count

SIZE = 256


def _old_map(maps: list[torch.Tensor], sigma: float) -> torch.Tensor:
    """The pre-2026-11-27 formula, written out: F.interpolate, product, Gaussian with the edge reflected."""
    out = None
    for m in maps:
        u = F.interpolate(m, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        out = u if out is None else out * u
    if sigma <= 0:
        return out
    k = _kernel(sigma).float()
    r = (len(k) - 1) // 2
    out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _bump_score(stride: int, cell: tuple[int, int], border: str) -> float:
    """Image score (mean of the top 0.1 %) of a map that is zero but for one cell."""
    h = SIZE // stride
    m = torch.zeros(1, 1, h, h)
    m[0, 0, cell[0] % h, cell[1] % h] = 1.0
    a = to_input_size([m], (SIZE, SIZE), 4.0, border=border).flatten()
    return float(a.topk(topk_count(0.001, SIZE * SIZE)).values.mean())


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_a_cell_on_the_border_scores_as_one_inside(stride):
    inside = _bump_score(stride, (SIZE // stride // 2, SIZE // stride // 2), "mean")
    for cell in [(0, 0), (0, 5), (-1, 3), (-1, -1), (1, 1), (2, 0)]:
        assert _bump_score(stride, cell, "mean") == pytest.approx(inside, rel=0.01), cell
    # what the clamped maps did (why the key exists): the corner cell counted far more than an inner one
    assert _bump_score(stride, (0, 0), "clamp") > 1.25 * _bump_score(stride, (SIZE // stride // 2,) * 2, "clamp")


def test_clamp_is_the_old_map_and_mean_differs_only_near_the_border():
    g = torch.Generator().manual_seed(0)
    stages = [torch.rand(2, 1, SIZE // s, SIZE // s, generator=g) for s in (4, 8, 16)]
    for maps in (stages, stages[1:2]):
        for sigma in (0.0, 4.0):
            torch.testing.assert_close(to_input_size(maps, (SIZE, SIZE), sigma, border="clamp"), _old_map(maps, sigma))
        # unsmoothed: equal inside the outermost centres of the coarsest cells, different on the border
        new, old = to_input_size(maps, (SIZE, SIZE), 0.0), _old_map(maps, 0.0)
        torch.testing.assert_close(new[..., 8:-8, 8:-8], old[..., 8:-8, 8:-8])
        assert not torch.allclose(new, old)
    # a flat map stays flat (the border adds nothing), also when not square and not a whole number of cells
    flat = torch.full((1, 1, 25, 19), 0.3)
    torch.testing.assert_close(to_input_size([flat], (197, 150), 4.0), torch.full((1, 1, 197, 150), 0.3))
    torch.testing.assert_close(to_input_size([flat, flat], (197, 150), 4.0, "sum"), torch.full((1, 1, 197, 150), 0.6))
