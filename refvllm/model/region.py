"""The region encoder: mask pooling of patch features, temporal merge per object, MLP to the LLM's width.

All (sample, object, frame) masks of a batch are handled at once: no Python loop over objects or frames.

Contract:
    enc = RegionEncoder(vision_dim, llm_dim, hidden, layout, patch_size, pooling="area")
    tokens = enc(features, region_masks, region_frame_index, region_object_index, num_objects)
        features            [N_F, grid*grid, D_v]  patch features of every frame of the batch (row-major grid)
        region_masks        bool [N_M, S, S]        one mask per (object, frame)

The pooling functions below also take a rectangular grid, ``grid=(rows, cols)`` with masks [N_M, H, W] (a
pretrained VLM's frames keep their aspect ratio); an int ``grid`` is the square ``(grid, grid)``.
        region_frame_index  long [N_M]              row of ``features`` of each mask
        region_object_index long [N_M]              object 0..num_objects-1 of each mask
        -> [sum_o layout.num_region_tokens(n_o), D_llm]: object order, time order within an object,
           n_o = number of masks of object o.

Pooling weights (per mask, over the patch grid, normalised to sum 1):
    area    the fraction of each patch that the mask covers (patch (i, j) sees pixels [i*p, (i+1)*p) of the
            S x S frame, exactly what the vision tower's patch embedding sees)
    binary  bilinear resize of the mask to the grid, then > 0 (the reference project's rule; dilates small and
            thin objects)
A mask that gets no weight (binary on a tiny object, or area on an object inside the border pixels that the
patch grid does not cover) falls back to the area weights of the patches nearest to it (adaptive pooling
over the whole S x S frame): never zeros, never the whole frame. An empty mask is a ModelInputError.

Temporal merge to at most K = ``layout.region_max_tokens`` tokens per object (``layout.region_merge``):
    merge    repeatedly average the most cosine-similar adjacent pair (ties -> lowest index), each token
             weighted by the number of frames it already holds; deterministic, per object, so the result does
             not depend on the other objects of the batch
    uniform  split the object's frames into min(K, n) contiguous bins of (nearly) equal size and average each
    none     one token per mask frame
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from refvllm.errors import ModelInputError
from refvllm.layout import TokenLayout
from refvllm.model.vision import mlp

POOLING_MODES = ("area", "binary")
Grid = int | tuple[int, int]  # patches per side (square), or (rows, cols)


def grid_shape(grid: Grid) -> tuple[int, int]:
    """(rows, cols) of a square side or a (rows, cols) pair."""
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def mask_patch_weights(masks: torch.Tensor, grid: Grid, patch: int, pooling: str = "area") -> torch.Tensor:
    """bool [N_M, H, W] -> float32 [N_M, rows*cols] pooling weights, each row summing to 1."""
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    rows, cols = grid_shape(grid)
    h, w = masks.shape[-2:]
    if h < rows * patch or w < cols * patch:
        raise ModelInputError(f"region masks are {h}x{w} pixels; the {rows}x{cols} patch grid needs at least "
                              f"{rows * patch}x{cols * patch}")
    if pooling == "area":
        weights = patch_coverage(masks, grid, patch).flatten(1)
    else:
        resized = F.interpolate(masks[:, None].float(), size=(rows, cols), mode="bilinear", align_corners=False)
        weights = (resized[:, 0] > 0).float().flatten(1)
    total = weights.sum(1)
    missing = (total == 0).nonzero().flatten()
    if len(missing):  # rare: one host sync, then only those masks take the slower path
        fallback = F.adaptive_avg_pool2d(masks[missing, None].float(), (rows, cols)).flatten(1)
        empty = (fallback.sum(1) == 0).nonzero().flatten()
        if len(empty):
            raise ModelInputError(f"region mask {int(missing[empty[0]])} of the batch is empty "
                                  f"({len(empty)} empty masks in all); every kept mask must cover some pixels")
        weights[missing] = fallback
        total = weights.sum(1)
    return weights / total[:, None]


GEOMETRY_DIM = 8


def mask_geometry(weights: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Pooling weights [N_M, rows*cols] -> [N_M, 6]: weighted centroid (x, y) and box (x0, y0, x1, y1) of the
    patches each mask covers, in [0, 1] grid coordinates (patch centres)."""
    rows, cols = grid_shape(grid)
    w = weights.float().unflatten(1, (rows, cols))  # [N, row, col]
    x_pos = (torch.arange(cols, device=w.device, dtype=torch.float32) + 0.5) / cols
    y_pos = (torch.arange(rows, device=w.device, dtype=torch.float32) + 0.5) / rows
    col_mass, row_mass = w.sum(1), w.sum(2)  # [N, cols], [N, rows]; rows of weights sum to 1
    cx, cy = col_mass @ x_pos, row_mass @ y_pos
    big = torch.tensor(2.0, device=w.device)
    x0 = torch.where(col_mass > 0, x_pos, big).amin(1)
    y0 = torch.where(row_mass > 0, y_pos, big).amin(1)
    x1 = torch.where(col_mass > 0, x_pos, -big).amax(1)
    y1 = torch.where(row_mass > 0, y_pos, -big).amax(1)
    return torch.stack([cx, cy, x0, y0, x1, y1], dim=1)


def region_geometry(weights: torch.Tensor, grid: Grid, frame_index: torch.Tensor, object_index: torch.Tensor,
                    num_objects: int) -> torch.Tensor:
    """[N_M, GEOMETRY_DIM] per mask: :func:`mask_geometry` (centroid and box) plus the centroid's displacement
    from the object's first mask frame, so a token states where the object has moved without the LLM having to
    subtract two tokens. Frame indices are global frame rows, in time order within a sample."""
    return with_displacement(mask_geometry(weights, grid), frame_index, object_index, num_objects)


def with_displacement(geo: torch.Tensor, frame_index: torch.Tensor, object_index: torch.Tensor,
                      num_objects: int) -> torch.Tensor:
    """[N_M, 6] :func:`mask_geometry` -> [N_M, GEOMETRY_DIM]: plus each centroid's displacement from its
    object's first mask frame (the smallest ``frame_index`` of the object)."""
    first = torch.full((num_objects,), torch.iinfo(torch.long).max, dtype=torch.long, device=geo.device)
    first = first.scatter_reduce(0, object_index, frame_index, reduce="amin")
    is_first = frame_index == first[object_index]
    start = geo.new_zeros(num_objects, 2).index_copy_(0, object_index[is_first], geo[is_first, :2])
    return torch.cat([geo, geo[:, :2] - start[object_index]], dim=1)


def patch_coverage(masks: torch.Tensor, grid: Grid, patch: int) -> torch.Tensor:
    """bool [N, H, W] -> float32 [N, rows, cols]: the fraction of each patch's pixels that the mask covers
    (patch (i, j) sees pixels [i*p, (i+1)*p) x [j*p, (j+1)*p); what lies beyond the grid is not counted).

    The pixels of ``patch`` consecutive rows are summed 8 at a time: each mask row is read as int64 words whose
    8 bytes are 0/1 pixels, and adding ``patch`` (< 256) such words never carries from one byte into the next,
    so the bytes of the sum are the per-column counts. This reads the 75 M pixels of a 16-frame batch once, ~5x
    faster on CPU than any float conversion of them. The column sums then run on a ``patch``-times smaller tensor.
    """
    if patch > 255:
        raise ValueError(f"patch size {patch} > 255 overflows a byte lane")
    rows, cols = grid_shape(grid)
    width = masks.shape[-1]
    pixels = masks.contiguous().view(torch.uint8)
    if width % 8:  # whole int64 words per row; the padding columns lie outside the patch grid
        pixels = F.pad(pixels, (0, 8 - width % 8))
    words = pixels.view(torch.int64)[:, : rows * patch].unflatten(1, (rows, patch))  # a view: no copy
    counts = words.sum(2).view(torch.uint8)[..., : cols * patch]  # [N, rows, cols*patch] pixels per column
    return counts.unflatten(-1, (cols, patch)).sum(-1, dtype=torch.int16).float() / (patch * patch)


def _rank_within(keys: torch.Tensor, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each element among the elements with the same key, in index order; and the count per key."""
    counts = torch.bincount(keys, minlength=num_keys)
    order = torch.argsort(keys, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(keys)
    rank[order] = torch.arange(len(keys), device=keys.device) - starts[keys[order]]
    return rank, counts


def pool_regions(features: torch.Tensor, weights: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    """Weighted average of each mask's frame features: [N_F, P, D], [N_M, P], [N_M] -> [N_M, D].

    One bmm over frames: each frame's masks are stacked as rows of a [N_F, max masks per frame, P] weight
    tensor, so every frame's features are read once (no [N_M, P, D] gather).
    """
    n_f = features.shape[0]
    slot, per_frame = _rank_within(frame_index, n_f)
    w = features.new_zeros(n_f, int(per_frame.max()), weights.shape[1])
    w[frame_index, slot] = weights.to(features.dtype)
    return torch.bmm(w, features)[frame_index, slot]


def _by_object(object_index: torch.Tensor, frame_index: torch.Tensor, num_objects: int):
    """Sort masks by (object, frame). Returns the order, each sorted mask's position in its object, the masks
    per object [O], and the object of each sorted mask."""
    if int(object_index.max()) >= num_objects or int(object_index.min()) < 0:
        raise ModelInputError(f"region_object_index holds object {int(object_index.max())} but the batch has "
                              f"{num_objects} objects")
    key = object_index * (int(frame_index.max()) + 1) + frame_index
    order = torch.argsort(key, stable=True)
    obj = object_index[order]
    pos, counts = _rank_within(obj, num_objects)
    return order, pos, counts, obj


def merge_adjacent(x: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the most cosine-similar adjacent pair of each object until it holds at most ``k`` tokens.

    x: [O, T, D] left-aligned tokens (object o has ``counts[o]`` valid ones). Returns the merged tokens
    [O, T, D] (left-aligned, zero beyond the new counts) and the new counts [O].

    All objects merge in lock-step (one step per loop iteration; an object that is done is left unchanged).
    Tokens stay in their slots: a merged pair lives in its left slot, the right slot dies, and ``nxt``/``prv``
    link the live slots, so a step touches O x D values (the pair and its two neighbour similarities) rather
    than shifting O x T x D. ``sim[o, i]`` is the cosine of live slot i and the next live slot (-inf if none).
    """
    # Merge decisions in float32 with autocast off: under CUDA autocast cosine_similarity returns bf16, which
    # cannot be written into the float32 similarity table, and bf16 ties would make the choice less stable.
    with torch.autocast(device_type=x.device.type, enabled=False):
        out, n = _merge_adjacent_fp32(x.float(), counts, k)
    return out.to(x.dtype), n


def _merge_adjacent_fp32(x: torch.Tensor, counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_adjacent` on float32 input."""
    o, t, d = x.shape
    rows, slots = torch.arange(o, device=x.device), torch.arange(t, device=x.device)
    sums = x.clone()  # feature sums; cosine of sums = cosine of means
    held = torch.ones(o, t, dtype=x.dtype, device=x.device)  # frames per token
    alive = slots[None] < counts[:, None]
    nxt = torch.where(slots[None] + 1 < counts[:, None], slots[None] + 1, t)  # t: no live slot after
    prv = (slots - 1).repeat(o, 1)  # -1: no live slot before
    sim = torch.full((o, t), float("-inf"), dtype=x.dtype, device=x.device)
    if t > 1:
        sim[:, :-1] = F.cosine_similarity(sums[:, :-1], sums[:, 1:], dim=-1)
    sim = sim.masked_fill(slots[None] >= (counts - 1)[:, None], float("-inf"))
    n = counts.clone()
    for _ in range(int((counts - k).clamp(min=0).max()) if o else 0):
        act = n > k
        j = sim.argmax(dim=1)  # left slot of the pair; the first maximum, so ties go to the lowest index
        right = nxt[rows, j].clamp(max=t - 1)  # the slot it absorbs (valid where act)
        after = nxt[rows, right]  # live slot after the pair, t if none
        before = prv[rows, j]  # live slot before the pair, -1 if none
        sums[rows, j] = torch.where(act[:, None], sums[rows, j] + sums[rows, right], sums[rows, j])
        held[rows, j] = torch.where(act, held[rows, j] + held[rows, right], held[rows, j])
        alive[rows, right] &= ~act
        nxt[rows, j] = torch.where(act, after, nxt[rows, j])
        has_after, has_before = act & (after < t), act & (before >= 0)
        prv[rows, after.clamp(max=t - 1)] = torch.where(has_after, j, prv[rows, after.clamp(max=t - 1)])
        sim[rows, right] = torch.where(act, float("-inf"), sim[rows, right])
        new_after = F.cosine_similarity(sums[rows, j], sums[rows, after.clamp(max=t - 1)], dim=-1)
        sim[rows, j] = torch.where(has_after, new_after, torch.where(act, float("-inf"), sim[rows, j]))
        b = before.clamp(min=0)
        new_before = F.cosine_similarity(sums[rows, b], sums[rows, j], dim=-1)
        sim[rows, b] = torch.where(has_before, new_before, sim[rows, b])
        n = n - act.long()
    tokens = (sums / held[..., None])[alive]  # live slots in (object, slot) order = (object, time) order
    out = x.new_zeros(o, t, d)
    out[slots[None] < n[:, None]] = tokens
    return out, n


class RegionEncoder(nn.Module):
    """Mask pooling + temporal merge + 2-layer MLP. See the module docstring for the contract."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int, layout: TokenLayout, patch_size: int,
                 pooling: str = "area", geometry: bool = False):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        self.layout, self.patch_size, self.pooling = layout, patch_size, pooling
        self.mlp = mlp(vision_dim, hidden, llm_dim)
        # Optional: where the mask lies (centroid and box on the patch grid, displacement since the object's first
        # mask frame), embedded and added to the pooled feature. PyTorch's default init, not zeros: zero-initialised
        # it stayed near zero next to features of large scale, and the questions that need it (motion, left of)
        # stayed at chance (the tiny VLM's encoder features, docs/model.md "The tiny VLM demo").
        self.geometry = nn.Linear(GEOMETRY_DIM, vision_dim) if geometry else None

    def pool(self, features: torch.Tensor, region_masks: torch.Tensor, region_frame_index: torch.Tensor,
             region_object_index: torch.Tensor | None = None, num_objects: int = 0) -> torch.Tensor:
        """[N_F, P, D_v] features, bool [N_M, S, S] masks, [N_M] frames -> [N_M, D_v] pooled features.
        With geometry on, the objects of the masks ([N_M], ``num_objects``) are needed too."""
        if int(region_frame_index.max()) >= features.shape[0] or int(region_frame_index.min()) < 0:
            raise ModelInputError(f"region_frame_index holds frame {int(region_frame_index.max())} but the batch "
                                  f"has {features.shape[0]} frames")
        if self.geometry is not None and region_object_index is None:
            raise ValueError("region geometry needs region_object_index and num_objects")
        objects = region_object_index if region_object_index is not None else torch.zeros_like(region_frame_index)
        return self.pool_groups([(features, self.layout.grid, self.patch_size)], region_masks,
                                torch.zeros_like(region_frame_index), region_frame_index, objects, num_objects)

    def pool_groups(self, groups: list[tuple[torch.Tensor, Grid, int]], region_masks: torch.Tensor,
                    group_index: torch.Tensor, frame_index: torch.Tensor, region_object_index: torch.Tensor,
                    num_objects: int) -> torch.Tensor:
        """Pooling over feature groups with grids of their own (a pretrained VLM's videos keep their aspect
        ratio, so each has its own patch grid): ``groups[g] = (features [F_g, rows_g*cols_g, D], (rows_g,
        cols_g), patch_g)``; mask m (bool [N_M, H, W], zero-padded beyond its group's grid) pools frame
        ``frame_index[m]`` of group ``group_index[m]``. -> [N_M, D] pooled features in mask order."""
        n = len(region_masks)
        geo = region_masks.new_zeros(n, 6, dtype=torch.float32) if self.geometry is not None else None
        parts = []  # (mask rows, their pooled features) per group
        for g, (features, grid, patch) in enumerate(groups):
            rows = (group_index == g).nonzero().flatten()
            if len(rows) == 0:
                continue
            if int(frame_index[rows].max()) >= features.shape[0]:
                raise ModelInputError(f"a region mask is on frame {int(frame_index[rows].max())} of visual {g}, "
                                      f"which has {features.shape[0]} frames")
            weights = mask_patch_weights(region_masks[rows], grid, patch, self.pooling)
            parts.append((rows, pool_regions(features, weights, frame_index[rows])))
            if self.geometry is not None:
                geo[rows] = mask_geometry(weights, grid)
        if not parts:  # no masks at all
            return groups[0][0].new_zeros(0, groups[0][0].shape[-1])
        if len(parts) == 1 and len(parts[0][0]) == n:  # one group holds every mask, in order: no scatter
            pooled = parts[0][1]
        else:  # the dtype of the pooling's output (autocast may make it bf16), not of the features
            pooled = parts[0][1].new_zeros(n, parts[0][1].shape[-1])
            for rows, part in parts:
                pooled[rows] = part
        if self.geometry is not None:
            # Displacement in time order within an object: (group, frame) keys, one group per object.
            key = group_index * (int(frame_index.max()) + 1) + frame_index
            full = with_displacement(geo, key, region_object_index, num_objects)
            pooled = pooled + self.geometry(full.to(pooled.dtype))
        return pooled

    def merge(self, pooled: torch.Tensor, region_frame_index: torch.Tensor, region_object_index: torch.Tensor,
              num_objects: int) -> torch.Tensor:
        """[N_M, D] pooled masks -> [sum_o layout.num_region_tokens(n_o), D] in object, then time order."""
        order, pos, counts, obj = _by_object(region_object_index, region_frame_index, num_objects)
        if num_objects and int(counts.min()) == 0:
            raise ModelInputError(f"object {int((counts == 0).nonzero()[0])} of the batch has no region mask; "
                                  "every object needs at least one")
        x = pooled[order]
        k, mode = self.layout.region_max_tokens, self.layout.region_merge
        if mode == "none":
            return x
        if mode == "uniform":
            bins = torch.tensor([self.layout.num_region_tokens(c) for c in counts.tolist()], device=x.device)
            first = torch.cumsum(bins, 0) - bins
            token = first[obj] + pos * bins[obj] // counts[obj]
            sums = x.new_zeros(int(bins.sum()), x.shape[1]).index_add_(0, token, x)
            return sums / torch.bincount(token, minlength=sums.shape[0]).to(x.dtype)[:, None]
        padded = x.new_zeros(num_objects, int(counts.max()), x.shape[1])
        padded[obj, pos] = x
        merged, n = merge_adjacent(padded, counts, k)
        return merged[torch.arange(merged.shape[1], device=x.device)[None] < n[:, None]]

    def forward(self, features: torch.Tensor, region_masks: torch.Tensor, region_frame_index: torch.Tensor,
                region_object_index: torch.Tensor, num_objects: int) -> torch.Tensor:
        """See the module docstring. With no masks, returns an empty [0, D_llm] tensor."""
        if region_masks.shape[0] == 0:
            return self.mlp(features.new_zeros(0, features.shape[-1]))
        pooled = self.pool(features, region_masks, region_frame_index, region_object_index, num_objects)
        return self.mlp(self.merge(pooled, region_frame_index, region_object_index, num_objects))
