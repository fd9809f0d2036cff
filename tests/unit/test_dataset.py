"""RefDataset (lazy, bad-sample policy) and ResumableSampler (determinism, ranks, steps, exact resume)."""

import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from refvllm.data.collate import Collator
from refvllm.data.dataset import BadSampleCounter, RefDataset, ResumableSampler, Skipped
from refvllm.data.processor import Processor
from refvllm.errors import ConfigError, DataError
from refvllm.layout import TokenLayout, VisualSpec
from refvllm.model.tiny import train_tokenizer

S = 16
SPEC = VisualSpec(image_size=S, patch_size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LAYOUT = TokenLayout(grid=4, spatial_pool=2, temporal_pool=1, region_max_tokens=4, region_merge="merge")


# ---------------------------------------------------------------- dataset


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A JSONL file: image referring (ok), missing image (bad), region/object mismatch (bad), image QA (ok)."""
    root = tmp_path_factory.mktemp("data")
    pixels = np.zeros((24, 32, 3), np.uint8)
    pixels[4:12, 4:12] = (255, 0, 0)
    Image.fromarray(pixels).save(root / "red.jpg")
    mask = np.zeros((24, 32), bool)
    mask[4:12, 4:12] = True
    ann = [{"0": {"segmentation": _rle(mask)}}]
    conv = [{"from": "human", "value": "<image>\nWhat colour is <region>?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "good", "image": "red.jpg", "conversations": conv, "annotation": ann},
        {"id": "missing", "image": "nowhere.jpg", "conversations": conv, "annotation": ann},
        {"id": "mismatch", "image": "red.jpg", "conversations": conv, "annotation": ann + ann},
        {"id": "plain", "image": "red.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A square."}]},
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture(scope="module")
def processor():
    return Processor(train_tokenizer(), LAYOUT, SPEC, max_length=512, num_frames=4, mask_resize="rescale")


@pytest.fixture
def dataset(data_dir, processor, tmp_path):
    return RefDataset(data_dir / "train.jsonl", data_dir, processor, num_frames=4, image_size=S,
                      mask_resize="rescale", cache_dir=tmp_path / "cache")


def test_good_samples_are_processed(dataset):
    assert len(dataset) == 4
    good = dataset[0]
    assert good["sample_index"] == 0 and good["sample_id"] == "good"
    assert good["pixel_values"].shape == (1, 3, S, S) and good["region_masks"].shape == (1, S, S)
    assert good["num_objects"] == 1 and int((good["input_ids"] == -300).sum()) == 1
    assert dataset[3]["num_objects"] == 0


def test_bad_samples_are_skipped_and_logged_once(dataset, caplog):
    with caplog.at_level(logging.WARNING, logger="refvllm.data.dataset"):
        first, again, mismatch = dataset[1], dataset[1], dataset[2]
    assert isinstance(first, Skipped) and first == again
    assert (first.index, first.id) == (1, "missing") and "nowhere.jpg" in first.reason
    assert isinstance(mismatch, Skipped) and (mismatch.index, mismatch.id) == (2, "mismatch")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one per bad sample, not per access
    assert "sample 1 (id missing)" in messages[0] and "nowhere.jpg" in messages[0]


def test_loader_batches_count_skipped_samples(dataset, processor):
    sampler = ResumableSampler(len(dataset), seed=0, micro_batch_size=4, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(processor.pad_token_id))
    batch = next(iter(loader))
    assert batch["batch_size"] == 2 and batch["sample_id"] == ["good", "plain"]
    assert batch["num_skipped"] == 2 and [s["id"] for s in batch["skipped"]] == ["missing", "mismatch"]


def test_dataset_is_picklable_and_lazy(dataset):
    assert not any(isinstance(v, (list, dict)) and len(v) > 100 for v in vars(dataset).values())
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == 4
    assert torch.equal(clone[0]["input_ids"], dataset[0]["input_ids"])
    assert isinstance(clone[1], Skipped)


def test_bad_sample_counter():
    counter = BadSampleCounter(max_bad_samples=2)
    counter.add([{"index": 1, "id": "a", "reason": "x"}])
    counter.add([])
    counter.add([{"index": 5, "id": "b", "reason": "broken mask"}])
    assert counter.count == 2
    restored = BadSampleCounter(2)
    restored.load_state_dict(counter.state_dict())
    with pytest.raises(DataError, match="3 bad samples skipped.*max_bad_samples=2.*broken") as info:
        restored.add([{"index": 7, "id": "c", "reason": "broken mask"}])
    assert info.value.index == 7
    unlimited = BadSampleCounter(-1)
    unlimited.add([{"index": i, "id": None, "reason": "x"} for i in range(1000)])


# ---------------------------------------------------------------- sampler


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_epochs_are_seeded_permutations():
    sampler = ResumableSampler(12, seed=5, micro_batch_size=3)
    batches = take(sampler, 8)  # two epochs of 4 micro-batches
    epoch0, epoch1 = sum(batches[:4], []), sum(batches[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12)) and epoch0 != epoch1
    assert take(ResumableSampler(12, seed=5, micro_batch_size=3), 8) == batches
    assert take(ResumableSampler(12, seed=6, micro_batch_size=3), 4) != batches[:4]
    assert sum(take(ResumableSampler(12, seed=5, micro_batch_size=3, shuffle=False), 4), []) == list(range(12))


def test_micro_batches_straddle_epochs_without_dropping():
    sampler = ResumableSampler(5, seed=0, micro_batch_size=2)
    stream = sum(take(sampler, 5), [])  # 10 positions = exactly 2 epochs
    assert sorted(stream[:5]) == sorted(stream[5:]) == list(range(5))
    assert sampler.epoch_of(2) == 0 and sampler.epoch_of(3) == 1


def test_ranks_take_disjoint_interleaved_micro_batches():
    world, mb = 3, 2
    single = take(ResumableSampler(30, seed=1, micro_batch_size=mb), 15)  # one epoch
    ranks = [take(ResumableSampler(30, seed=1, micro_batch_size=mb, num_replicas=world, rank=r), 5)
             for r in range(world)]
    assert sorted(sum(sum(ranks, []), [])) == list(range(30))
    for r in range(world):
        assert ranks[r] == single[r::world]  # global micro-batch g = k * world + r


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_steps_hold_the_same_micro_batches_for_any_world_size(world, accum):
    reference = ResumableSampler(23, seed=3, micro_batch_size=2)
    samplers = [ResumableSampler(23, seed=3, micro_batch_size=2, num_replicas=world, rank=r) for r in range(world)]
    streams = [take(s, 3 * accum) for s in samplers]
    for step in range(3):
        got = sorted(streams[r][step * accum + m] for r in range(world) for m in range(accum))
        want = sorted(reference.microbatch_indices(step, m, grad_accum=4) for m in range(4))
        assert got == want
        for r in range(world):
            for m in range(accum):
                assert streams[r][step * accum + m] == samplers[r].microbatch_indices(step, m, accum)


class _Counting(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.touched = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.touched.append(i)
        return i


@pytest.mark.parametrize("world", [1, 2])
def test_resume_continues_exactly_and_touches_nothing_before(world):
    uninterrupted = [take(ResumableSampler(10, seed=0, micro_batch_size=3, num_replicas=world, rank=r), 9)
                     for r in range(world)]
    for r in range(world):
        first = ResumableSampler(10, seed=0, micro_batch_size=3, num_replicas=world, rank=r)
        it = iter(first)
        consumed = [next(it) for _ in range(4)]
        next(it)  # prefetched by a worker but never consumed: must come again after resume
        state = first.state_dict(consumed=4)
        assert state["position"] == 4 * world
        resumed = ResumableSampler(10, seed=0, micro_batch_size=3, num_replicas=world, rank=r)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        data = _Counting(10)
        loader = torch.utils.data.DataLoader(data, batch_sampler=resumed, collate_fn=list)
        loader_it = iter(loader)
        rest = [next(loader_it) for _ in range(5)]
        assert consumed + rest == uninterrupted[r]
        assert data.touched == sum(rest, [])  # no replay of consumed micro-batches
        assert resumed.state_dict(consumed=5)["position"] == 9 * world


def test_resume_rejects_a_different_data_order():
    state = ResumableSampler(10, seed=0, micro_batch_size=2).state_dict(consumed=3)
    for kwargs in ({"num_samples": 11}, {"seed": 1}, {"micro_batch_size": 4}):
        args = {"num_samples": 10, "seed": 0, "micro_batch_size": 2} | kwargs
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            ResumableSampler(**args).load_state_dict(state)
    with pytest.raises(ConfigError, match="multiple"):
        ResumableSampler(10, seed=0, micro_batch_size=2, num_replicas=2).load_state_dict(state)


# ---------------------------------------------------------------- token budget and length grouping

LENGTHS = np.random.default_rng(7).integers(50, 900, size=41)


def _budget(**kwargs):
    args = {"num_samples": 41, "seed": 2, "micro_batch_size": 4, "lengths": LENGTHS, "max_tokens": 1000} | kwargs
    return ResumableSampler(**args)


def test_token_budget_fills_micro_batches_up_to_the_budget():
    sampler = _budget()
    batches, seen = [], []
    while len(seen) < 41:  # the first epoch
        batch = sampler.global_microbatch(len(batches))
        batches.append(batch)
        seen += batch
    assert sorted(seen) == list(range(41))  # every sample once, none dropped or repeated
    assert sampler.epoch_of(len(batches) - 1) == 0 and sampler.epoch_of(len(batches)) == 1
    for k, batch in enumerate(batches):
        total = int(LENGTHS[batch].sum())
        assert 1 <= len(batch) <= 4 and (total <= 1000 or len(batch) == 1)
        if k + 1 < len(batches) and len(batch) < 4:  # cut only because the next sample did not fit
            assert total + LENGTHS[batches[k + 1][0]] > 1000
    assert len(batches) < 41  # several samples per micro-batch on average


def test_token_budget_keeps_the_step_and_resume_contracts():
    reference = _budget()
    for world, accum in ((2, 2), (4, 1)):
        samplers = [_budget(num_replicas=world, rank=r) for r in range(world)]
        streams = [take(s, 5 * accum) for s in samplers]  # past the first epoch
        for step in range(5):
            got = sorted(streams[r][step * accum + m] for r in range(world) for m in range(accum))
            assert got == sorted(reference.microbatch_indices(step, m, grad_accum=4) for m in range(4))
    first = _budget(num_replicas=2, rank=1)
    it = iter(first)
    consumed = [next(it) for _ in range(13)]  # into the second epoch
    resumed = _budget(num_replicas=2, rank=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(consumed=13))))
    assert consumed + take(resumed, 4) == take(_budget(num_replicas=2, rank=1), 17)
    with pytest.raises(ConfigError, match="max_tokens"):
        _budget(max_tokens=2000).load_state_dict(first.state_dict(consumed=2))
    with pytest.raises(ConfigError, match="token-length estimates"):
        _budget(lengths=LENGTHS + 1).load_state_dict(first.state_dict(consumed=2))


def test_length_grouping_sorts_within_windows_only():
    lengths = np.random.default_rng(0).integers(1, 1000, size=300)
    grouped = ResumableSampler(300, seed=1, micro_batch_size=2, lengths=lengths, group_by_length=True)
    plain = ResumableSampler(300, seed=1, micro_batch_size=2)
    order, base = grouped.epoch_order(0), plain.epoch_order(0)
    window = ResumableSampler.GROUP_WINDOW * 2
    for start in range(0, 300, window):
        part = order[start:start + window]
        assert sorted(part) == sorted(base[start:start + window])  # same samples per window
        assert (np.diff(lengths[part]) <= 0).all()  # longest first
    assert sorted(order) == list(range(300))


def test_length_estimates_match_the_encoded_lengths(dataset, processor, tmp_path):
    from refvllm.data.lengths import sample_lengths

    lengths = sample_lengths(dataset)
    assert lengths.shape == (4,) and lengths.dtype == np.int64
    for i in (0, 3):  # the good samples: an image with a region, a plain image question
        assert lengths[i] == len(dataset[i]["input_ids"])
    assert lengths[1] == lengths[0]  # the missing image is not opened: estimated like the good one, skipped later
    assert len(list((tmp_path / "cache").glob("*-lengths-*.npy"))) == 1
    dataset.processor.estimate_tokens = None  # a second call reads the cache, it does not tokenise again
    try:
        assert sample_lengths(dataset).tolist() == lengths.tolist()
    finally:
        del dataset.processor.estimate_tokens
