"""collate: concatenation with offset index tensors, padding both sides, skipped items, empty batches."""

import pickle

import pytest
import torch

from refvllm.constants import IGNORE_INDEX, REGION_TOKEN_ID, VISUAL_TOKEN_ID
from refvllm.data.collate import Collator, collate
from refvllm.data.types import Skipped

S = 8
PAD = 7


def item(index, length, frames, mask_pairs, num_objects, labels=True):
    """A processed sample by hand: frame f of sample i is filled with 100*i + f; masks (frame, object) local."""
    ids = torch.arange(10, 10 + length)
    ids[0] = VISUAL_TOKEN_ID
    out = {
        "input_ids": ids,
        "pixel_values": torch.stack([torch.full((3, S, S), 100.0 * index + f) for f in range(frames)])
        if frames else torch.zeros((0, 3, S, S)),
        "region_masks": torch.stack([torch.full((S, S), True)] * len(mask_pairs))
        if mask_pairs else torch.zeros((0, S, S), dtype=torch.bool),
        "region_frame_index": torch.tensor([f for f, _ in mask_pairs], dtype=torch.long),
        "region_object_index": torch.tensor([o for _, o in mask_pairs], dtype=torch.long),
        "num_objects": num_objects,
        "sample_index": index,
        "sample_id": f"id{index}",
    }
    if labels:
        out["labels"] = torch.where(torch.arange(length) >= length - 2, ids, IGNORE_INDEX)
    else:
        out["reference"] = f"answer {index}"
    return out


@pytest.fixture
def items():
    a = item(0, 5, frames=3, mask_pairs=[(0, 0), (2, 0), (1, 1)], num_objects=2)
    b = item(1, 2, frames=0, mask_pairs=[], num_objects=0)
    c = item(2, 4, frames=2, mask_pairs=[(1, 0)], num_objects=1)
    return [a, Skipped(9, "bad9", "media missing"), b, c]


def test_frames_and_masks_are_concatenated_with_global_indices(items):
    batch = collate(items, PAD)
    assert batch["batch_size"] == 3
    assert batch["pixel_values"].shape == (5, 3, S, S)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0, 1, 2, 200, 201]  # sample-major
    assert batch["frame_sample_index"].tolist() == [0, 0, 0, 2, 2]
    assert batch["frames_per_sample"].tolist() == [3, 0, 2]
    assert batch["region_masks"].shape == (4, S, S) and batch["region_masks"].dtype == torch.bool
    # sample c's mask is on its local frame 1 -> global frame row 3 + 1; its object 0 -> global object 2
    assert batch["region_frame_index"].tolist() == [0, 2, 1, 4]
    assert batch["region_object_index"].tolist() == [0, 0, 1, 2]
    assert batch["object_sample_index"].tolist() == [0, 0, 2]
    assert batch["objects_per_sample"].tolist() == [2, 0, 1]
    assert batch["sample_index"].tolist() == [0, 1, 2] and batch["sample_id"] == ["id0", "id1", "id2"]
    # every mask's frame belongs to the mask's sample
    mask_sample = batch["object_sample_index"][batch["region_object_index"]]
    assert torch.equal(batch["frame_sample_index"][batch["region_frame_index"]], mask_sample)


def test_right_padding(items):
    batch = collate(items, PAD)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == attn.shape == (3, 5) and ids.dtype == attn.dtype == torch.long
    assert ids[1].tolist() == [VISUAL_TOKEN_ID, 11, PAD, PAD, PAD]
    assert attn.tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert labels[2].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX]
    assert torch.equal(ids[0], items[0]["input_ids"])


def test_left_padding_for_generation():
    prompts = [item(0, 5, 1, [(0, 0)], 1, labels=False), item(1, 3, 1, [], 0, labels=False)]
    batch = collate(prompts, PAD, padding_side="left")
    assert "labels" not in batch
    assert batch["input_ids"][1].tolist() == [PAD, PAD, VISUAL_TOKEN_ID, 11, 12]
    assert batch["attention_mask"].tolist() == [[1] * 5, [0, 0, 1, 1, 1]]
    assert batch["references"] == ["answer 0", "answer 1"]


def test_skipped_items_are_dropped_and_reported(items):
    batch = collate(items, PAD)
    assert batch["num_skipped"] == 1
    assert batch["skipped"] == [{"index": 9, "id": "bad9", "reason": "media missing", "category": None}]
    assert collate(items[:1], PAD)["num_skipped"] == 0 and collate(items[:1], PAD)["skipped"] == []


def test_all_skipped_gives_an_empty_batch():
    batch = collate([Skipped(1, None, "x"), Skipped(2, "b", "y", "too_long")], PAD)
    assert batch["batch_size"] == 0 and batch["num_skipped"] == 2
    assert [(s["index"], s["category"]) for s in batch["skipped"]] == [(1, None), (2, "too_long")]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (0, 0)
    assert batch["pixel_values"].shape[0] == 0 and batch["pixel_values"].dim() == 4
    assert batch["region_masks"].shape[0] == 0 and batch["region_masks"].dtype == torch.bool
    for key in ("frame_sample_index", "frames_per_sample", "region_frame_index", "region_object_index",
                "object_sample_index", "objects_per_sample", "sample_index"):
        assert batch[key].shape == (0,) and batch[key].dtype == torch.long, key
    assert batch["sample_id"] == []


def test_region_sentinels_survive_and_counts_add_up():
    a = item(0, 6, 2, [(0, 0), (1, 0)], 1)
    a["input_ids"][1:3] = REGION_TOKEN_ID
    batch = collate([a, item(1, 3, 1, [], 0)], PAD)
    assert int((batch["input_ids"] == REGION_TOKEN_ID).sum()) == 2
    assert int((batch["input_ids"] == VISUAL_TOKEN_ID).sum()) == 2


def test_collator_is_picklable_and_equal_to_collate(items):
    collator = pickle.loads(pickle.dumps(Collator(PAD, padding_side="left")))
    got, want = collator(items), collate(items, PAD, padding_side="left")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_bad_arguments():
    with pytest.raises(ValueError, match="padding_side"):
        Collator(PAD, padding_side="middle")
    with pytest.raises(ValueError, match="labels"):
        collate([item(0, 3, 1, [], 0), item(1, 3, 1, [], 0, labels=False)], PAD)
    small = item(1, 3, 1, [], 0)
    small["pixel_values"] = torch.zeros((1, 3, 4, 4))
    with pytest.raises(ValueError, match="different sizes"):
        collate([item(0, 3, 1, [], 0), small], PAD)
