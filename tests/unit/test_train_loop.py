"""Loop pieces that need no model: the loader position, the dummy batch, the save schedule."""

from types import SimpleNamespace

from refvllm.train.checkpoint import TrainerState
from refvllm.train.loop import _should_save, make_dummy_batch, next_batch


def _run(num_samples: int):
    return SimpleNamespace(loader=SimpleNamespace(dataset=[None] * num_samples), consumed=0, state=TrainerState(),
                           cfg=SimpleNamespace(data=SimpleNamespace(train_file="train.json")))


def _batch(size: int, skipped: list[int]):
    return {"batch_size": size, "skipped": [{"index": i, "id": str(i), "reason": "bad"} for i in skipped],
            "num_skipped": len(skipped)}


def test_every_batch_is_taken_and_counted():
    """Empty micro-batches are returned too (train_step runs the dummy batch for them): every process takes the
    same number of batches per step, so the data position is the same everywhere."""
    run = _run(10)
    batches = iter([_batch(0, [1, 2]), _batch(1, [4]), _batch(2, [])])
    assert [next_batch(run, batches)["num_skipped"] for _ in range(3)] == [2, 1, 0]
    assert run.consumed == 3 and run.state.micro_batches == 3


def test_dummy_batch_layout():
    from refvllm.data.processor import Processor

    processor = SimpleNamespace(spec=SimpleNamespace(image_size=16), pad_token_id=7,
                                batch_visuals=Processor.batch_visuals)
    processor.dummy_item = lambda: Processor.dummy_item(processor)
    processor.collate = lambda items: Processor.collate(processor, items)
    processor.collator = lambda side="right": Processor.collator(processor, side)
    batch = make_dummy_batch(processor)
    assert batch["batch_size"] == 1 and batch["input_ids"].tolist() == [[7, 7]]
    assert (batch["labels"] == -100).all() and batch["attention_mask"].tolist() == [[1, 1]]
    assert tuple(batch["pixel_values"].shape) == (0, 3, 16, 16) and tuple(batch["region_masks"].shape) == (0, 16, 16)
    assert batch["frames_per_sample"].tolist() == [0] and batch["object_sample_index"].numel() == 0


def test_save_schedule():
    cfg = SimpleNamespace(train=SimpleNamespace(max_steps=10, save_steps=4))
    assert [s for s in range(1, 11) if _should_save(cfg, s)] == [4, 8, 10]
    cfg.train.save_steps = 0
    assert [s for s in range(1, 11) if _should_save(cfg, s)] == [10]
