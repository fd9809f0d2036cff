"""Region encoder: pooling weights, pooling, temporal merge, locality, counts, batch independence.

The references below are deliberately naive (loops over objects, frames and patches), independent of the
vectorised code under test.
"""

import pytest
import torch
import torch.nn.functional as F

from refvllm.errors import ModelInputError
from refvllm.layout import TokenLayout
from refvllm.model.region import (
    RegionEncoder,
    mask_geometry,
    mask_patch_weights,
    merge_adjacent,
    pool_regions,
    region_geometry,
)

GRID, PATCH, S, D = 8, 8, 64, 16


def _layout(merge="merge", k=3):
    return TokenLayout(grid=GRID, spatial_pool=2, temporal_pool=1, region_max_tokens=k, region_merge=merge)


def _random_masks(n, s=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, s, s, dtype=torch.bool)
    for i in range(n):
        y0, x0 = torch.randint(0, s - 4, (2,), generator=g).tolist()
        h, w = torch.randint(1, s // 2, (2,), generator=g).tolist()
        masks[i, y0:y0 + h, x0:x0 + w] = True
    return masks


def _naive_area_weights(mask, grid, patch):
    w = torch.zeros(grid * grid)
    for i in range(grid):
        for j in range(grid):
            w[i * grid + j] = mask[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].float().mean()
    return w / w.sum()


def _naive_merge(tokens, k):
    """Python list version: merge the most cosine-similar adjacent pair (first on ties), frame-weighted."""
    items = [(t.clone(), 1) for t in tokens]  # (mean, frames held)
    while len(items) > k:
        sims = [F.cosine_similarity(items[i][0], items[i + 1][0], dim=0).item() for i in range(len(items) - 1)]
        j = sims.index(max(sims))
        (a, na), (b, nb) = items[j], items[j + 1]
        items[j:j + 2] = [((a * na + b * nb) / (na + nb), na + nb)]
    return [t for t, _ in items]


def _naive_uniform(tokens, k):
    n = len(tokens)
    m = min(k, n)
    return [torch.stack([tokens[i] for i in range(n) if i * m // n == b]).mean(0) for b in range(m)]


def _naive_encoder(enc, features, masks, frame_idx, obj_idx, num_objects):
    """Per object, per frame: weights -> pooled feature -> merge -> MLP."""
    out = []
    for o in range(num_objects):
        rows = sorted((int(frame_idx[m]), m) for m in range(len(masks)) if int(obj_idx[m]) == o)
        pooled = []
        for f, m in rows:
            w = _naive_area_weights(masks[m], GRID, PATCH)
            pooled.append((w[:, None] * features[f]).sum(0))
        mode, k = enc.layout.region_merge, enc.layout.region_max_tokens
        merged = pooled if mode == "none" else (_naive_merge if mode == "merge" else _naive_uniform)(pooled, k)
        out += [enc.mlp(t) for t in merged]
    return torch.stack(out)


def _inputs(num_objects=3, frames=6, seed=0):
    """Objects with different numbers of mask frames, masks in a shuffled order (the encoder must sort)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, GRID * GRID, D, generator=g)
    pairs = []
    for o in range(num_objects):
        n = 1 + (o * 2 + seed) % frames
        pairs += [(o, f) for f in sorted(torch.randperm(frames, generator=g)[:n].tolist())]
    perm = torch.randperm(len(pairs), generator=g).tolist()
    pairs = [pairs[i] for i in perm]
    obj = torch.tensor([p[0] for p in pairs])
    frame = torch.tensor([p[1] for p in pairs])
    return features, _random_masks(len(pairs), seed=seed), frame, obj


def test_area_weights_are_patch_coverage():
    masks = _random_masks(6)
    weights = mask_patch_weights(masks, GRID, PATCH, "area")
    for m in range(6):
        torch.testing.assert_close(weights[m], _naive_area_weights(masks[m], GRID, PATCH))


def test_area_weights_ignore_uncovered_border_and_fall_back_inside_it():
    # 30 x 30 frame, 7-pixel patches: the grid covers 28 pixels, like 384 px with 14-pixel patches (27 * 14 = 378).
    masks = torch.zeros(2, 30, 30, dtype=torch.bool)
    masks[0, 0:14, 0:30] = True  # rows of patches 0 and 1, plus the uncovered border columns
    masks[1, 29, 29] = True  # only in the uncovered border: falls back to the nearest patch
    w = mask_patch_weights(masks, 4, 7, "area")
    torch.testing.assert_close(w[0], torch.tensor([0.125] * 8 + [0.0] * 8))
    torch.testing.assert_close(w[1], F.one_hot(torch.tensor(15), 16).float())


def test_binary_weights_tiny_object_falls_back_to_touched_patch():
    masks = torch.zeros(2, S, S, dtype=torch.bool)
    masks[0, 0, 0] = True  # bilinear to 8x8 then > 0 misses a single corner pixel
    masks[1, 16:40, 8:24] = True
    w = mask_patch_weights(masks, GRID, PATCH, "binary")
    torch.testing.assert_close(w[0], F.one_hot(torch.tensor(0), 64).float())  # never zeros, never the frame
    resized = F.interpolate(masks[1:, None].float(), size=(GRID, GRID), mode="bilinear", align_corners=False)
    expected = (resized[0, 0] > 0).float().flatten()
    torch.testing.assert_close(w[1], expected / expected.sum())
    # binary dilates: it touches patches the object covers less than fully
    assert (w[1] > 0).sum() >= (mask_patch_weights(masks[1:], GRID, PATCH, "area")[0] > 0).sum()


def test_empty_mask_is_an_error():
    masks = _random_masks(3)
    masks[1] = False
    with pytest.raises(ModelInputError, match="region mask 1 of the batch is empty"):
        mask_patch_weights(masks, GRID, PATCH)


def test_pool_regions_equals_per_mask_sum():
    features, masks, frame, _ = _inputs()
    weights = mask_patch_weights(masks, GRID, PATCH)
    pooled = pool_regions(features, weights, frame)
    for m in range(len(masks)):
        torch.testing.assert_close(pooled[m], (weights[m][:, None] * features[frame[m]]).sum(0))


@pytest.mark.parametrize("mode", ["merge", "uniform", "none"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_encoder_equals_naive_reference_and_counts(mode, seed):
    torch.manual_seed(0)
    layout = _layout(mode, k=3)
    enc = RegionEncoder(D, 12, 20, layout, PATCH)
    features, masks, frame, obj = _inputs(num_objects=4, frames=7, seed=seed)
    tokens = enc(features, masks, frame, obj, 4)
    ref = _naive_encoder(enc, features, masks, frame, obj, 4)
    counts = torch.bincount(obj, minlength=4).tolist()
    assert tokens.shape == (sum(layout.num_region_tokens(n) for n in counts), 12)
    assert counts != [counts[0]] * 4 and max(counts) > 3  # the case exercises merging and different lengths
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


def test_merge_steps_by_hand():
    # v v v w w (w orthogonal to v), K=2: merges (0,1), (0,1), then (1,2) -> [v (3 frames), w (2 frames)].
    v, w = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([v, 2 * v, 3 * v, w, 3 * w])[None]
    merged, n = merge_adjacent(x, torch.tensor([5]), 2)
    assert n.tolist() == [2]
    torch.testing.assert_close(merged[0, :2], torch.stack([2 * v, 2 * w]))
    assert merged[0, 2:].abs().sum() == 0


def test_merge_ties_go_to_lowest_index():
    x = torch.ones(1, 4, 3)
    x[0, 3] *= 5.0  # every adjacent pair has cosine 1
    merged, n = merge_adjacent(x, torch.tensor([4]), 3)
    torch.testing.assert_close(merged[0, :3], torch.tensor([[1.0] * 3, [1.0] * 3, [5.0] * 3]))


@pytest.mark.parametrize("mode", ["merge", "uniform", "none"])
def test_same_object_alone_or_in_a_batch_gives_same_tokens(mode):
    torch.manual_seed(0)
    layout = _layout(mode, k=2)
    enc = RegionEncoder(D, 12, 20, layout, PATCH)
    features, masks, frame, obj = _inputs(num_objects=5, frames=8, seed=2)
    batched = enc(features, masks, frame, obj, 5)
    counts = [layout.num_region_tokens(n) for n in torch.bincount(obj, minlength=5).tolist()]
    start = 0
    for o in range(5):
        sel = obj == o
        alone = enc(features, masks[sel], frame[sel], torch.zeros(int(sel.sum()), dtype=torch.long), 1)
        torch.testing.assert_close(alone, batched[start:start + counts[o]], atol=1e-6, rtol=1e-6)
        start += counts[o]


def test_features_outside_the_mask_do_not_matter_inside_they_do():
    torch.manual_seed(0)
    enc = RegionEncoder(D, 12, 20, _layout("merge", k=2), PATCH)
    features = torch.randn(3, GRID * GRID, D)
    masks = torch.zeros(3, S, S, dtype=torch.bool)
    masks[:, 8:24, 16:40] = True  # patches rows 1-2, columns 2-4
    frame, obj = torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long)
    base = enc(features, masks, frame, obj, 1)
    inside = torch.zeros(GRID, GRID, dtype=torch.bool)
    inside[1:3, 2:5] = True
    inside = inside.flatten()
    changed_out = features.clone()
    changed_out[:, ~inside] += 10 * torch.randn_like(changed_out[:, ~inside])
    torch.testing.assert_close(enc(changed_out, masks, frame, obj, 1), base, atol=0, rtol=0)
    changed_in = features.clone()
    changed_in[1, inside.nonzero()[0]] += 1.0
    assert (enc(changed_in, masks, frame, obj, 1) - base).abs().max() > 1e-3


def test_object_without_masks_is_an_error():
    enc = RegionEncoder(D, 12, 20, _layout(), PATCH)
    features, masks, frame, obj = _inputs(num_objects=2)
    with pytest.raises(ModelInputError, match="object 2 of the batch has no region mask"):
        enc(features, masks, frame, obj, 3)


def test_no_masks_gives_empty_tokens():
    enc = RegionEncoder(D, 12, 20, _layout(), PATCH)
    out = enc(torch.randn(2, 64, D), torch.zeros(0, S, S, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
              torch.zeros(0, dtype=torch.long), 0)
    assert out.shape == (0, 12)


def test_bf16_features():
    torch.manual_seed(0)
    enc = RegionEncoder(D, 12, 20, _layout(), PATCH).to(torch.bfloat16)
    features, masks, frame, obj = _inputs()
    out = enc(features.to(torch.bfloat16), masks, frame, obj, 3)
    ref = RegionEncoder(D, 12, 20, _layout(), PATCH)
    ref.load_state_dict({k: v.float() for k, v in enc.state_dict().items()})
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(features, masks, frame, obj, 3), atol=0.05, rtol=0.05)


def test_object_index_out_of_range_is_an_error():
    enc = RegionEncoder(D, 12, 20, _layout(), PATCH)
    features, masks, frame, obj = _inputs(num_objects=3)
    with pytest.raises(ModelInputError, match="holds object 2 but the batch has 2 objects"):
        enc(features, masks, frame, obj, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["merge", "uniform"])
def test_cuda_matches_cpu(mode):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    enc = RegionEncoder(D, 12, 20, _layout(mode), PATCH)
    features, masks, frame, obj = _inputs(num_objects=4, frames=7, seed=1)
    masks[0] = False
    masks[0, 0, 0] = True  # exercises the fallback path on the device
    cpu = enc(features, masks, frame, obj, 4)
    gpu = enc.cuda()(features.cuda(), masks.cuda(), frame.cuda(), obj.cuda(), 4)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)
    assert torch.equal(mask_patch_weights(masks.cuda(), GRID, PATCH).cpu(), mask_patch_weights(masks, GRID, PATCH))


def _merge_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 6, 8, generator=g), torch.tensor([6, 4, 2])


def test_merge_keeps_input_dtype_and_decides_in_float32():
    x, counts = _merge_inputs()
    ref, n_ref = merge_adjacent(x, counts, 2)
    out, n = merge_adjacent(x.bfloat16(), counts, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(n, n_ref)
    assert torch.allclose(out.float(), ref, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autocast returns bf16 similarities there)")
def test_merge_under_cuda_autocast():
    x, counts = _merge_inputs()
    ref, _ = merge_adjacent(x, counts, 2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = merge_adjacent(x.cuda(), counts.cuda(), 2)
    assert torch.allclose(out.cpu(), ref, atol=1e-5)


def test_mask_geometry_centroid_and_box():
    grid = 4
    w = torch.zeros(1, grid, grid)
    w[0, 1, 2] = w[0, 1, 3] = 0.5  # row 1, columns 2-3
    geo = mask_geometry(w.flatten(1), grid)[0]
    assert torch.allclose(geo, torch.tensor([3.0 / 4, 1.5 / 4, 2.5 / 4, 1.5 / 4, 3.5 / 4, 1.5 / 4]))


def test_geometry_tells_apart_identical_features_from_the_start():
    """Geometry is added to the pooled features through a linear layer at PyTorch's default init (not zeros):
    from the first step, two masks on identical features give different tokens; the layer's input is exactly
    the masks' region_geometry."""
    layout = TokenLayout(4, 1, 1, 4, "none")
    plain = RegionEncoder(8, 16, 16, layout, 8)
    geo = RegionEncoder(8, 16, 16, layout, 8, geometry=True)
    geo.mlp.load_state_dict(plain.mlp.state_dict())
    assert geo.geometry.weight.abs().sum() > 0
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :8, :8] = True  # top-left patch
    masks[1, :8, 24:] = True  # top-right patch
    index = (torch.tensor([0, 0]), torch.tensor([0, 1]), 2)
    same_feats = torch.ones(1, 16, 8)  # identical features everywhere: only geometry can tell them apart
    assert torch.allclose(*plain(same_feats, masks, *index))
    out = geo(same_feats, masks, *index)
    assert not torch.allclose(out[0], out[1])
    weights = mask_patch_weights(masks, 4, 8)
    expected = plain.mlp(1.0 + geo.geometry(region_geometry(weights, 4, index[0], index[1], 2)))
    torch.testing.assert_close(out, expected)


def test_region_geometry_adds_displacement_from_first_frame():
    grid = 4
    w = torch.zeros(3, grid, grid)
    w[0, 0, 3] = 1.0  # object 0 at its later frame 7: patch (row 0, col 3)
    w[1, 0, 0] = 1.0  # object 0 at its first frame 5: patch (row 0, col 0)
    w[2, 2, 2] = 1.0  # object 1, one frame
    geo = region_geometry(w.flatten(1), grid, torch.tensor([7, 5, 5]), torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(geo[0, 6:], torch.tensor([0.75, 0.0]))  # moved right by 3 of 4 patches
    assert torch.allclose(geo[1, 6:], torch.zeros(2)) and torch.allclose(geo[2, 6:], torch.zeros(2))
    assert torch.allclose(geo[:, :6], mask_geometry(w.flatten(1), grid))



# ------------------------------------------------------------------------------- rectangular patch grids


def _naive_coverage(mask, rows, cols, patch):
    """Loop over patches: the covered fraction of each patch's pixels."""
    out = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = mask[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].float().mean()
    return out


@pytest.mark.parametrize("height, width, rows, cols, patch", [
    (28, 42, 2, 3, 14),  # a Qwen2.5-VL-like frame (14-px patches), width not a multiple of 8
    (30, 45, 2, 3, 14),  # plus uncovered border rows and columns
    (56, 28, 4, 2, 14),  # taller than wide
    (24, 24, 3, 3, 8),  # square through the tuple form
])
def test_rectangular_area_weights_are_patch_coverage(height, width, rows, cols, patch):
    g = torch.Generator().manual_seed(height * width)
    masks = torch.rand(5, height, width, generator=g) > 0.6
    weights = mask_patch_weights(masks, (rows, cols), patch, "area")
    for m in range(5):
        naive = _naive_coverage(masks[m], rows, cols, patch).flatten()
        torch.testing.assert_close(weights[m], naive / naive.sum())


def test_square_grid_as_int_or_pair_is_the_same():
    masks = _random_masks(4)
    for pooling in ("area", "binary"):
        torch.testing.assert_close(mask_patch_weights(masks, GRID, PATCH, pooling),
                                   mask_patch_weights(masks, (GRID, GRID), PATCH, pooling))


def test_rectangular_geometry_uses_each_axis_own_extent():
    w = torch.zeros(1, 2, 4)
    w[0, 1, 3] = 1.0  # bottom row, last column
    geo = mask_geometry(w.flatten(1), (2, 4))[0]
    torch.testing.assert_close(geo, torch.tensor([3.5 / 4, 1.5 / 2, 3.5 / 4, 1.5 / 2, 3.5 / 4, 1.5 / 2]))


def test_rectangular_binary_and_fallback():
    masks = torch.zeros(2, 28, 42, dtype=torch.bool)
    masks[0, 0:14, 28:42] = True  # the top-right patch exactly
    masks[1, 27, 41] = True  # one pixel: binary resize to 2 x 3 may miss it, the fallback never does
    for pooling in ("area", "binary"):
        w = mask_patch_weights(masks, (2, 3), 14, pooling)
        assert int(w[0].argmax()) == 2 and torch.allclose(w.sum(1), torch.ones(2))
        assert int(w[1].argmax()) == 5  # bottom-right


def test_masks_smaller_than_a_rectangular_grid_are_an_input_error():
    with pytest.raises(ModelInputError, match=r"region masks are 28x30 pixels; the 2x3 patch grid needs at least "
                                              r"28x42"):
        mask_patch_weights(torch.ones(1, 28, 30, dtype=torch.bool), (2, 3), 14)
