"""``refvllm infer`` and the RefInference API on a tiny trained checkpoint and synthetic media."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import train_tiny_checkpoint
from PIL import Image

from refvllm.cli import main as cli
from refvllm.data.collate import collate
from refvllm.data.masks import decode_mask
from refvllm.errors import DataError
from refvllm.infer import Query, RefInference, _cli_masks, _parser, query_sample

pytestmark = pytest.mark.slow  # a module fixture trains a tiny model (~5 s)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inferrun")
    checkpoint, assets = train_tiny_checkpoint(tmp_path_factory.getbasetemp())
    samples = json.loads(Path(assets["eval_file"]).read_text())
    video = next(s for s in samples if "video" in s and len(s.get("annotation", [])) == 1)
    return {"root": root, "checkpoint": checkpoint, "data_root": Path(assets["data.data_root"]), "sample": video,
            "engine": RefInference.from_pretrained(checkpoint, ["eval.max_new_tokens=6"])}


def _first_mask(run):
    """The sample's first annotated frame and its mask as a bool array at the media's size."""
    frame, entry = next(iter(run["sample"]["annotation"][0].items()))
    return int(frame), decode_mask(entry["segmentation"], 64, 64)


def test_ask_uses_the_training_frame_plan_and_the_mask(run):
    engine = run["engine"]
    frame, mask = _first_mask(run)
    video = run["data_root"] / run["sample"]["video"]
    sample, root = query_sample(Query(video, [mask], "What colour is <region>?", frame))
    item = engine.prepare(sample, root)
    assert item["pixel_values"].shape[0] == engine.processor.num_frames == 8  # the checkpoint's frame count
    assert item["region_masks"].shape[0] == 1 and bool(item["region_masks"][0].any())
    answer = engine.ask(video, [mask], "What colour is <region>?", frame_idx=frame)
    assert isinstance(answer, str)


def _input_sensitive_engine(checkpoint):
    """The checkpoint with its LLM's and region encoder's matrices redrawn larger (fixed seed), so that greedy
    answers differ from prompt to prompt (one training step leaves a model that says the same thing to
    everything) and depend on the region tokens."""
    engine = RefInference.from_pretrained(checkpoint, ["eval.max_new_tokens=5", "eval.batch_size=4"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*engine.model.llm.parameters(), *engine.model.region.parameters()]:
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return engine


def test_batched_greedy_equals_one_by_one(run):
    engine = _input_sensitive_engine(run["checkpoint"])
    frame, mask = _first_mask(run)
    video = run["data_root"] / run["sample"]["video"]
    image = next(run["data_root"].glob("images/*.jpg"))
    queries = [Query(video, [mask], "What colour is <region>?", frame),
               Query(video, [], "How many objects are in the video?"),
               Query(image, [], "How many objects are in the image?"),
               Query(video, [{frame: mask}], "Which direction does <region> move in this video clip?"),
               Query(video, [mask], "What shape is <region>?", frame)]
    batched = engine.ask_batch(queries)  # batches of 4 and 1, left-padded to different lengths
    one_by_one = [engine.ask(q.video, q.masks, q.question, q.frame_idx) for q in queries]
    assert batched == one_by_one
    assert len(set(batched)) >= 4  # the answers depend on the input, so the order is checked too


def test_ablate_regions_reaches_the_model(run, monkeypatch):
    engine = run["engine"]
    frame, mask = _first_mask(run)
    video = run["data_root"] / run["sample"]["video"]
    queries = [Query(video, [mask], "What colour is <region>?", frame), Query(video, [], "How many objects?")]
    items = [engine.prepare(*query_sample(q, i)) for i, q in enumerate(queries)]
    batch = engine._to_device(collate(items, engine.processor.pad_token_id, padding_side="left"))
    with torch.no_grad():
        plain, ablated = (engine.model(batch, ablate_regions=a).logits.float().cpu() for a in (False, True))
    assert (plain[0] - ablated[0]).abs().max() > 1e-2  # the region tokens change the logits after them
    assert torch.allclose(plain[1], ablated[1], atol=1e-5)  # nothing to ablate without a region
    seen, generate = [], engine.model.generate

    def spy(b, **kw):
        seen.append(kw["ablate_regions"])
        return generate(b, **kw)

    monkeypatch.setattr(engine.model, "generate", spy)
    engine.ask_batch(queries, ablate_regions=True)
    engine.ask(video, [], "How many objects?")
    assert seen == [True, False]


def test_png_and_json_masks_make_the_same_model_input(run, tmp_path):
    frame, mask = _first_mask(run)
    png = tmp_path / "mask.png"
    Image.fromarray(np.stack([mask.astype(np.uint8) * 200] * 3 + [np.full(mask.shape, 255, np.uint8)], -1)).save(png)
    annotation = tmp_path / "mask.json"
    annotation.write_text(json.dumps({"annotation": [{str(frame): run["sample"]["annotation"][0][str(frame)]}]}))
    video = run["data_root"] / run["sample"]["video"]
    items = []
    for extra in (["--mask-png", str(png), "--frame-idx", str(frame)], ["--mask-json", str(annotation)]):
        args = _parser().parse_args(["--model", "m", "--video", str(video), "--question", "<region>?", *extra])
        sample, root = query_sample(Query(video, _cli_masks(args), "What colour is <region>?"))
        items.append(run["engine"].prepare(sample, root))
    assert torch.equal(items[0]["region_masks"], items[1]["region_masks"])
    assert torch.equal(items[0]["region_frame_index"], items[1]["region_frame_index"])
    assert torch.equal(items[0]["input_ids"], items[1]["input_ids"])


def test_region_count_must_match_the_masks(run):
    frame, mask = _first_mask(run)
    video = run["data_root"] / run["sample"]["video"]
    with pytest.raises(DataError, match="0 <region> placeholder.*1 mask"):
        run["engine"].ask(video, [mask], "What colour is it?", frame_idx=frame)
    with pytest.raises(DataError, match="does not exist"):
        run["engine"].ask(run["root"] / "missing.mp4", [], "Hi?")


def test_cli_png_and_json_masks_give_the_same_answer(run, tmp_path, capsys):
    frame, mask = _first_mask(run)
    png = tmp_path / "mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(png)
    annotation = tmp_path / "mask.json"
    annotation.write_text(json.dumps([{str(frame): run["sample"]["annotation"][0][str(frame)]}]))
    video = str(run["data_root"] / run["sample"]["video"])
    common = ["infer", "--model", str(run["checkpoint"]), "--video", video, "--question",
              "What colour is <region>?", "eval.max_new_tokens=6"]
    assert cli([*common, "--mask-png", str(png), "--frame-idx", str(frame)]) == 0
    from_png = capsys.readouterr().out.strip().splitlines()[-1:]
    assert cli([*common, "--mask-json", str(annotation)]) == 0
    from_json = capsys.readouterr().out.strip().splitlines()[-1:]
    assert from_png == from_json
    expected = run["engine"].ask(video, [mask], "What colour is <region>?", frame_idx=frame)
    assert from_png == ([expected] if expected else [])


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    frame, mask = _first_mask(run)
    png = tmp_path / "m.png"
    Image.fromarray(mask.astype(np.uint8)).save(png)
    video = str(run["data_root"] / run["sample"]["video"])
    args = ["infer", "--model", str(run["checkpoint"]), "--video", video, "--mask-png", str(png), str(png),
            "--frame-idx", "0", "1", "2", "--question", "<region> and <region>?"]
    assert cli(args) == 1
    assert "--frame-idx takes one value or one per --mask-png (2), got 3" in capsys.readouterr().err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"0": {"segmentation": null}}')
    assert cli(["infer", "--model", str(run["checkpoint"]), "--video", video, "--mask-json", str(bad_json),
                "--question", "<region>?"]) == 1
    assert "must hold a list" in capsys.readouterr().err


def test_sampling_is_optional(run):
    frame, mask = _first_mask(run)
    video = run["data_root"] / run["sample"]["video"]
    engine = run["engine"]
    kwargs = engine.generation_kwargs(do_sample=True, temperature=0.7, top_p=0.9)
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.7
    assert isinstance(engine.ask(video, [mask], "What colour is <region>?", frame, do_sample=True,
                                 temperature=0.7, top_p=0.9), str)


def test_greedy_ignores_a_checkpoint_generation_config_that_samples_and_penalises(run):
    """Qwen2.5's generation_config.json samples (temperature 0.7, top_p 0.8, top_k 20) and penalises repetition
    (1.05): greedy answers must be those of a model with no generation config at all, every time."""
    from transformers import GenerationConfig

    engine = _input_sensitive_engine(run["checkpoint"])
    engine.cfg.eval.max_new_tokens = 16  # long enough to repeat tokens, so that a repetition penalty would bite
    frame, mask = _first_mask(run)
    video = run["data_root"] / run["sample"]["video"]
    queries = [Query(video, [mask], q, frame) for q in ("What colour is <region>?", "Where does <region> go?",
                                                        "Is <region> a circle?", "Describe <region> <region>?")]
    queries[3] = Query(video, [mask, mask], queries[3].question, frame)
    llm_gen = engine.model.llm.generation_config
    clean = GenerationConfig(eos_token_id=llm_gen.eos_token_id, pad_token_id=llm_gen.pad_token_id)
    engine.model.llm.generation_config = clean
    reference = engine.ask_batch(queries)
    engine.model.llm.generation_config = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=5.0, no_repeat_ngram_size=1,
        eos_token_id=llm_gen.eos_token_id, pad_token_id=llm_gen.pad_token_id)
    assert engine.ask_batch(queries) == reference == engine.ask_batch(queries)
    used = engine.generation_kwargs()
    assert used["do_sample"] is False and used["repetition_penalty"] == 1.0 and used["top_k"] is None
    # The checkpoint's settings do change answers when they are let through: the check above is not vacuous.
    items = [engine.prepare(*query_sample(q, i)) for i, q in enumerate(queries)]
    batch = engine._to_device(collate(items, engine.processor.pad_token_id, padding_side="left"))
    greedy = engine.model.generate(batch, **engine.generation_kwargs(), eos_token_id=engine.eos_ids)
    penalised = engine.model.generate(batch, max_new_tokens=16, do_sample=False, top_k=None, top_p=None,
                                      temperature=None, eos_token_id=engine.eos_ids)  # what greedy meant before
    assert not torch.equal(penalised, greedy)
