"""The composite model on tiny checkpoints: splice, counts, loss, gradients, padding, backends, towers, LLMs,
generation, trainability and the weights saved outside the HF checkpoints.

Batches are built here directly as tensors following the batch contract of docs/architecture.md.
"""

import pytest
import torch
import torch.nn.functional as F

from refvllm.checkpoint import extra_trainable_names, load_extra_trainables, load_llm_adapter, save_extra_trainables
from refvllm.config import load_config
from refvllm.constants import IGNORE_INDEX, REGION_TOKEN_ID, VISUAL_TOKEN_ID
from refvllm.errors import ConfigError, ModelInputError
from refvllm.layout import TokenLayout
from refvllm.model.build import build_model, format_parameter_table, parameter_counts, parameter_groups
from refvllm.model.refvlm import count_label_tokens, left_padded
from refvllm.model.tiny import write_tiny_llm, write_tiny_vision
from refvllm.model.vision import Projector, VisionTower

S = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"siglip": write_tiny_vision(root / "siglip"), "clip": write_tiny_vision(root / "clip", kind="clip"),
            "siglip2": write_tiny_vision(root / "siglip2", kind="siglip2"),
            "qwen2": write_tiny_llm(root / "qwen2"), "llama": write_tiny_llm(root / "llama", kind="llama")}


def make_model(ckpt, vision="siglip", llm="qwen2", *overrides, seed=0):
    cfg = load_config(None, [f"model.vision_path={ckpt[vision]}", f"model.llm_path={ckpt[llm]}", "model.lora.r=4",
                             "model.lora.alpha=8", "model.lora.dropout=0.0", "model.region.max_tokens=2",
                             *overrides])
    torch.manual_seed(seed)
    return build_model(cfg.model, print_table=False).eval()


def make_sample(layout: TokenLayout, frames: int, objects: list[list[int]], n_text: int, seed: int) -> dict:
    """One processed sample (Processor.encode layout): text, visual run, one region run per object, answer."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 900, (n,), generator=g).tolist()  # noqa: E731
    ids = text(n_text) + [VISUAL_TOKEN_ID] * (layout.num_visual_tokens(frames) if frames else 0)
    for frame_list in objects:
        ids += text(2) + [REGION_TOKEN_ID] * layout.num_region_tokens(len(frame_list))
    prompt = len(ids)
    ids += text(4)
    labels = [IGNORE_INDEX] * prompt + ids[prompt:]
    masks, mask_frame, mask_obj = [], [], []
    for o, frame_list in enumerate(objects):
        for f in frame_list:
            y, x = torch.randint(0, S - 12, (2,), generator=g).tolist()
            m = torch.zeros(S, S, dtype=torch.bool)
            m[y:y + 4 + 2 * o, x:x + 12] = True
            masks.append(m)
            mask_frame.append(f)
            mask_obj.append(o)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "pixel_values": torch.randn(frames, 3, S, S, generator=g),
            "region_masks": torch.stack(masks) if masks else torch.zeros(0, S, S, dtype=torch.bool),
            "region_frame_index": torch.tensor(mask_frame, dtype=torch.long),
            "region_object_index": torch.tensor(mask_obj, dtype=torch.long), "num_objects": len(objects)}


def collate(samples: list[dict], pad_id: int = 0) -> dict:
    """The batch contract: right padding, concatenated frames/masks, global frame and object indices."""
    length = max(len(s["input_ids"]) for s in samples)
    pad = lambda t, v: F.pad(t, (0, length - len(t)), value=v)  # noqa: E731
    frames = torch.tensor([len(s["pixel_values"]) for s in samples])
    objects = torch.tensor([s["num_objects"] for s in samples])
    frame_off, obj_off = torch.cumsum(frames, 0) - frames, torch.cumsum(objects, 0) - objects
    return {
        "input_ids": torch.stack([pad(s["input_ids"], pad_id) for s in samples]),
        "labels": torch.stack([pad(s["labels"], IGNORE_INDEX) for s in samples]),
        "attention_mask": torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "frame_sample_index": torch.repeat_interleave(torch.arange(len(samples)), frames),
        "frames_per_sample": frames,
        "region_masks": torch.cat([s["region_masks"] for s in samples]),
        "region_frame_index": torch.cat([s["region_frame_index"] + frame_off[i] for i, s in enumerate(samples)]),
        "region_object_index": torch.cat([s["region_object_index"] + obj_off[i] for i, s in enumerate(samples)]),
        "object_sample_index": torch.repeat_interleave(torch.arange(len(samples)), objects),
    }


def three_samples(layout):
    return [make_sample(layout, 3, [[0, 1, 2], [1]], 5, seed=1),
            make_sample(layout, 4, [[0, 1, 2, 3]], 2, seed=2),
            make_sample(layout, 2, [[0], [0, 1], [1]], 9, seed=3)]


# ----------------------------------------------------------------------------------------------- forward
def test_loss_is_mean_over_label_tokens_or_sum_over_normaliser(ckpt):
    model = make_model(ckpt)
    batch = collate(three_samples(model.layout))
    out = model(batch)
    logits, labels = out.logits, batch["labels"]
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref)
    n = count_label_tokens(labels)
    assert n == 12
    torch.testing.assert_close(model(batch, loss_normalizer=100.0).loss, ref * n / 100.0)


def test_sample_alone_equals_sample_in_padded_batch(ckpt):
    model = make_model(ckpt)
    samples = three_samples(model.layout)
    batched = model(collate(samples)).logits
    for i, s in enumerate(samples):
        alone = model(collate([s])).logits[0]
        torch.testing.assert_close(batched[i, : len(alone)], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["visual", "region"])
def test_placeholder_count_mismatch_names_both_numbers(ckpt, kind):
    model = make_model(ckpt)
    samples = three_samples(model.layout)
    sentinel = VISUAL_TOKEN_ID if kind == "visual" else REGION_TOKEN_ID
    ids = samples[1]["input_ids"]
    first = int((ids == sentinel).nonzero()[0])
    samples[1]["input_ids"] = torch.cat([ids[:first], ids[first + 1:]])  # one position too few
    samples[1]["labels"] = samples[1]["labels"][1:]
    expected = model.layout.num_visual_tokens(4) if kind == "visual" else model.layout.num_region_tokens(4)
    with pytest.raises(ModelInputError, match=f"sample 1 of the batch has {expected - 1} {kind} placeholder "
                                              f"positions but {expected} {kind} feature rows"):
        model(collate(samples))


def test_ablate_regions_zeroes_region_positions_only(ckpt):
    model = make_model(ckpt)
    batch = collate(three_samples(model.layout))
    normal, _ = model.embed(batch)
    ablated, _ = model.embed(batch, ablate_regions=True)
    is_region = batch["input_ids"] == REGION_TOKEN_ID
    assert ablated[is_region].abs().sum() == 0 and normal[is_region].abs().sum() > 0
    torch.testing.assert_close(ablated[~is_region], normal[~is_region])



def test_region_dropout_zeroes_whole_samples_in_training_only(ckpt):
    model = make_model(ckpt, "siglip", "qwen2", "model.region.dropout=0.5")
    batch = collate(three_samples(model.layout))
    is_region = batch["input_ids"] == REGION_TOKEN_ID
    normal, _ = model.embed(batch)  # eval mode: dropout never applies
    model.train()
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        dropped, _ = model.embed(batch)
        torch.testing.assert_close(dropped[~is_region], normal[~is_region])
        for i in range(3):
            rows = dropped[i][is_region[i]]
            zeroed = bool(rows.abs().sum() == 0)
            if not zeroed:  # a kept sample keeps exactly its tokens
                torch.testing.assert_close(rows, normal[i][is_region[i]])
            seen.add((i, zeroed))
    assert seen == {(i, z) for i in range(3) for z in (True, False)}  # each sample both dropped and kept


def test_region_dropout_out_of_range_is_a_config_error(ckpt):
    with pytest.raises(ConfigError, match="model.region.dropout"):
        make_model(ckpt, "siglip", "qwen2", "model.region.dropout=1.0")

def _grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradients_reach_lora_projector_region_and_nothing_frozen(ckpt):
    model = make_model(ckpt)
    grads = _grads(model, collate(three_samples(model.layout)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"projector", "region", "llm"}
    assert all("lora_" in n for n in trainable if n.startswith("llm."))
    for name, g in grads.items():
        if name in trainable:
            assert g is not None, name
        else:
            assert g is None, name
    for module in ("projector", "region"):  # real gradients, not just zeros
        assert any(grads[n].abs().sum() > 0 for n in trainable if n.startswith(module))
    assert any(grads[n].abs().sum() > 0 for n in trainable if "lora_A" in n or "lora_B" in n)


@pytest.mark.parametrize("case", ["no_masks", "no_frames"])
def test_every_trainable_param_gets_a_gradient_without_regions_or_frames(ckpt, case):
    model = make_model(ckpt, "siglip", "qwen2", "model.train_vision=lora")
    layout = model.layout
    if case == "no_masks":
        samples = [make_sample(layout, 2, [], 4, seed=5), make_sample(layout, 1, [], 3, seed=6)]
    else:
        samples = [make_sample(layout, 0, [], 4, seed=5)]
    grads = _grads(model, collate(samples))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert grads[name] is not None, name
    if case == "no_masks":
        assert all(grads[n].abs().sum() == 0 for n, p in model.named_parameters() if n.startswith("region."))


@pytest.mark.parametrize("case", ["no_masks", "no_frames"])
def test_every_module_runs_on_every_batch_even_frozen(ckpt, case):
    """ZeRO-3 gathers frozen parameters collectively when a module runs: a frozen region encoder or projector
    skipped on a rank whose batch has no masks (or no frames) would hang the ranks that run it."""
    model = make_model(ckpt, "siglip", "qwen2", "model.train_region=frozen", "model.train_projector=frozen")
    layout = model.layout
    samples = ([make_sample(layout, 2, [], 4, seed=5)] if case == "no_masks" else [make_sample(layout, 0, [], 4,
                                                                                               seed=5)])
    calls = {name: 0 for name in ("vision", "projector", "region")}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    model(collate(samples))
    assert all(n >= 1 for n in calls.values()), calls


@pytest.mark.parametrize("case", ["no_masks", "no_frames"])
def test_the_llm_input_needs_a_gradient_in_every_batch(ckpt, case):
    """FSDP2 reduces a layer's gradients when the gradient of its input is computed, or, when its input needs
    none, at the end of the backward. The embedding table is frozen, so in a batch without frames or masks only
    the zero-valued term (it enters at the embeddings) makes the first layer's input need a gradient: without
    it the ranks reduced that layer at different points of the backward and 2 FSDP processes hung. Tower and
    projector frozen, so that the visual tokens of the no-masks batch need no gradient either."""
    model = make_model(ckpt, "siglip", "qwen2", "model.train_vision=frozen", "model.train_projector=frozen").train()
    layout = model.layout
    samples = ([make_sample(layout, 2, [], 4, seed=5)] if case == "no_masks" else [make_sample(layout, 0, [], 4,
                                                                                               seed=5)])
    seen = []
    first = model.llm.get_base_model().model.layers[0]
    first.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).requires_grad), with_kwargs=True)
    model(collate(samples)).loss.backward()
    assert seen == [True]


# ---------------------------------------------------------------------------------------- backends, models
def test_sdpa_and_eager_give_the_same_logits(ckpt):
    samples = three_samples(make_model(ckpt).layout)
    logits = [make_model(ckpt, "siglip", "qwen2", f"model.attn_implementation={a}")(collate(samples)).logits
              for a in ("sdpa", "eager")]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)


def test_flash_attention_without_flash_attn_is_a_config_error(ckpt):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="flash-attn"):
        make_model(ckpt, "siglip", "qwen2", "model.attn_implementation=flash_attention_2", "model.dtype=bfloat16")


@pytest.mark.parametrize(("vision", "llm"), [("clip", "llama"), ("siglip2", "qwen2")])
def test_towers_and_llms_work_end_to_end(ckpt, vision, llm):
    model = make_model(ckpt, vision, llm)
    assert type(model.vision.model).__name__ == {"clip": "CLIPVisionModel", "siglip2": "Siglip2VisionModel"}[vision]
    batch = collate(three_samples(model.layout))
    out = model(batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    new = model.generate(left_padded(batch), max_new_tokens=3, min_new_tokens=3)
    assert new.shape == (3, 3)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_full_checkpoint_loads_only_its_vision_tower(tmp_path, kind):
    import transformers

    config_cls, model_cls = {"siglip": (transformers.SiglipConfig, transformers.SiglipModel),
                             "clip": (transformers.CLIPConfig, transformers.CLIPModel)}[kind]
    cfg = config_cls(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4))
    full = model_cls(cfg)
    full.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(str(tmp_path), feature_layer=-2)
    x = torch.randn(2, 3, 32, 32)
    ref = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tower(x), ref[:, 1:] if kind == "clip" else ref)
    assert tower.grid == 4 and len(tower.model.encoder.layers) == 1


def test_vision_feature_layer_out_of_range(ckpt):
    with pytest.raises(ConfigError, match="vision_feature_layer 5"):
        VisionTower.from_pretrained(ckpt["siglip"], feature_layer=5)


def test_batched_generation_equals_one_by_one(ckpt):
    model = make_model(ckpt)
    samples = three_samples(model.layout)
    batched = model.generate(left_padded(collate(samples)), max_new_tokens=4, min_new_tokens=4)
    for i, s in enumerate(samples):
        alone = model.generate(collate([s]), max_new_tokens=4, min_new_tokens=4)
        assert alone[0].tolist() == batched[i].tolist()
    with pytest.raises(ModelInputError, match="left-padded"):
        model.generate(collate(samples), max_new_tokens=2)


def test_left_padded_moves_padding():
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    out = left_padded(batch)
    assert out["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bf16_weights(ckpt):
    model = make_model(ckpt, "siglip", "qwen2", "model.dtype=bfloat16")
    assert model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.vision.dtype == torch.bfloat16 and model.projector.mlp[0].weight.dtype == torch.float32
    model.train()
    out = model(collate(three_samples(model.layout)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()


# ------------------------------------------------------------------------------------------ projector
def test_projector_pools_ceil_spatially_and_temporally_within_samples():
    layout = TokenLayout(grid=5, spatial_pool=2, temporal_pool=2, region_max_tokens=4, region_merge="merge")
    proj = Projector(4, 6, 8, layout)
    feats = torch.randn(5, 25, 4)
    fps = torch.tensor([3, 2])  # sample 0: frames 0,1 | 2 ; sample 1: frames 3,4
    pooled = proj.pool(feats, fps)
    assert pooled.shape == (3 * 9, 4)
    grid = feats.view(5, 5, 5, 4)
    spatial = torch.stack([torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)) for j in range(3)], 1)
                           for i in range(3)], 1).flatten(1, 2)  # edge windows average only real patches
    expected = torch.cat([(spatial[0] + spatial[1]) / 2, spatial[2], (spatial[3] + spatial[4]) / 2])
    torch.testing.assert_close(pooled, expected)
    out = proj(feats, fps)
    assert out.shape == (sum(layout.num_visual_tokens(f) for f in fps.tolist()), 6)


# ------------------------------------------------------------------------------------------ trainability
def test_trainability_modes_and_parameter_groups(ckpt):
    model = make_model(ckpt, "siglip", "qwen2", "model.train_vision=full", "model.train_llm=frozen",
                       "model.train_projector=frozen")
    counts = parameter_counts(model)
    assert counts["vision"]["trainable"] == counts["vision"]["total"] > 0
    assert counts["llm"]["trainable"] == 0 and counts["projector"]["trainable"] == 0
    assert counts["region"]["trainable"] == counts["region"]["total"] > 0
    groups = parameter_groups(model)
    assert set(groups) == {"llm", "vision", "projector", "region"} and groups["llm"] == []
    assert sum(p.numel() for p in groups["vision"]) == counts["vision"]["trainable"]
    assert "region" in format_parameter_table(counts)
    model = make_model(ckpt, "siglip", "qwen2", "model.train_vision=lora", "model.train_llm=full")
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("vision.")]
    assert names and all("lora_" in n for n in names)
    assert parameter_counts(model)["llm"]["trainable"] == parameter_counts(model)["llm"]["total"]


def test_extra_trainables_round_trip_and_strict_keys(ckpt, tmp_path):
    model = make_model(ckpt, "siglip", "qwen2", "model.train_vision=lora", seed=0)
    names = extra_trainable_names(model)
    assert any(n.startswith("projector.") for n in names) and any(n.startswith("region.") for n in names)
    assert any("lora_" in n and n.startswith("vision.") for n in names) and not any(n.startswith("llm.") for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.add_(0.5)
    save_extra_trainables(model, tmp_path)
    other = make_model(ckpt, "siglip", "qwen2", "model.train_vision=lora", seed=1)
    load_extra_trainables(other, tmp_path)
    params = dict(other.named_parameters())
    for n, p in model.named_parameters():
        if n in names:
            assert torch.equal(params[n], p), n
    frozen_vision = make_model(ckpt)  # no vision LoRA: the file has keys this model lacks
    with pytest.raises(ConfigError, match="unexpected vision"):
        load_extra_trainables(frozen_vision, tmp_path)
    wider = make_model(ckpt, "siglip", "qwen2", "model.train_vision=lora", "model.region.hidden_size=8")
    with pytest.raises(ConfigError, match="wrong shape region.mlp"):
        load_extra_trainables(wider, tmp_path)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_llm_adapter_is_a_plain_peft_adapter(ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = make_model(ckpt)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.llm.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 99, 300, 12]])
    ours = model.llm(input_ids=ids).logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt["qwen2"]), tmp_path / "adapter")
    torch.testing.assert_close(plain(input_ids=ids).logits, ours)
    fresh = make_model(ckpt, seed=3)
    assert not torch.allclose(fresh.llm(input_ids=ids).logits, ours)
    load_llm_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(fresh.llm(input_ids=ids).logits, ours)


def test_tiny_checkpoints_are_made_on_first_use(tmp_path):
    cfg = load_config(None, ["model.tiny=true", f"model.vision_path={tmp_path}/v", f"model.llm_path={tmp_path}/l",
                             "model.lora.r=2"])
    model = build_model(cfg.model, print_table=False)
    assert (tmp_path / "v" / "preprocessor_config.json").is_file() and (tmp_path / "l" / "tokenizer.json").is_file()
    assert model.layout.grid == 8


def test_processor_and_collate_batches_fit_the_model(ckpt):
    """The data side's real Processor + collate produce batches whose counts the model accepts."""
    import numpy as np

    from refvllm.data.collate import collate as data_collate
    from refvllm.data.processor import Processor
    from refvllm.data.types import DecodedSample, FramePlan, Sample, Turn

    model = make_model(ckpt)
    cfg = load_config(None, [f"model.vision_path={ckpt['siglip']}", f"model.llm_path={ckpt['qwen2']}",
                             "model.region.max_tokens=2"])  # as make_model
    proc = Processor.from_config(cfg)
    rng = np.random.default_rng(0)

    def decoded(index, frames, objects):
        turns = [Turn("user", "<video>\n" + " and ".join(f"<object{k}><region>" for k in range(len(objects)))
                      + " : what colour?"), Turn("assistant", "red")]
        sample = Sample(index, str(index), "video_referring", "v.mp4", "video", turns,
                        [dict.fromkeys(f) for f in objects])
        pairs = [(k, f) for k, fs in enumerate(objects) for f in fs]
        masks = np.zeros((len(pairs), S, S), dtype=bool)
        for m in range(len(pairs)):
            masks[m, 10 + m:30, 20:40 + m] = True
        return DecodedSample(sample, FramePlan(list(range(frames)), objects),
                             rng.integers(0, 255, (frames, S, S, 3), dtype=np.uint8), masks,
                             np.array([f for _, f in pairs]), np.array([k for k, _ in pairs]))

    items = [proc.encode(decoded(0, 3, [[0, 1, 2], [1]])), proc.encode(decoded(1, 2, [[0]]))]
    batch = data_collate(items, proc.pad_token_id)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape
    prompts = [proc.encode_prompt(decoded(0, 3, [[0, 1, 2], [1]])), proc.encode_prompt(decoded(1, 2, [[0]]))]
    assert model.generate(data_collate(prompts, proc.pad_token_id, padding_side="left"), max_new_tokens=2).shape[0] == 2


def test_gradient_checkpointing_gives_the_same_gradients(ckpt):
    plain = make_model(ckpt, "siglip", "qwen2", "model.train_vision=full")
    ckpt_model = make_model(ckpt, "siglip", "qwen2", "model.train_vision=full", "model.gradient_checkpointing=true")
    for module in (ckpt_model.llm, ckpt_model.vision.model):
        assert getattr(module, "is_activation_checkpointing", None) or module.is_gradient_checkpointing
    batch = collate(three_samples(plain.layout))
    a, b = _grads(plain, batch), _grads(ckpt_model, batch)
    for name, g in a.items():
        if g is not None:
            torch.testing.assert_close(b[name], g, atol=1e-6, rtol=1e-4)


def test_mask_on_another_samples_frame_is_an_error(ckpt):
    model = make_model(ckpt)
    batch = collate(three_samples(model.layout))
    batch["region_frame_index"][0] = 5  # sample 0 has frames 0-2; frame 5 belongs to sample 1
    with pytest.raises(ModelInputError, match="region mask 0 belongs to an object of sample 0 but lies on a frame "
                                              "of sample 1"):
        model(batch)


# ------------------------------------------------------------------------------------------------- CUDA
def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@pytest.mark.gpu
def test_cuda_matches_cpu_and_bf16_trains_and_generates(ckpt):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = make_model(ckpt)
    gpu = make_model(ckpt).cuda()
    batch = collate(three_samples(cpu.layout))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's default TF32 convolutions (the patch embedding) differ by 1e-3
    try:
        torch.testing.assert_close(gpu(_to(batch, "cuda")).logits.cpu(), cpu(batch).logits, atol=1e-4, rtol=1e-3)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    bf16 = make_model(ckpt, "siglip", "qwen2", "model.dtype=bfloat16", "model.gradient_checkpointing=true").cuda()
    bf16.train()
    out = bf16(_to(batch, "cuda"), loss_normalizer=10.0)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in bf16.parameters() if p.requires_grad)
    bf16.eval()
    new = bf16.generate(left_padded(_to(batch, "cuda")), max_new_tokens=3, min_new_tokens=3)
    assert new.shape == (3, 3) and new.device.type == "cuda"


@pytest.mark.parametrize("targets", ["default", "with_head"])
def test_loss_at_label_positions_equals_the_full_computation(ckpt, targets):
    """logits_at='labels' (the trainer's: LM head and cross-entropy only where a label is) gives the loss and
    the gradients of the full [B, L, V] computation, with a LoRA on the output head too."""
    extra = ["model.lora.target_modules=[q_proj,v_proj,lm_head]"] if targets == "with_head" else []
    model = make_model(ckpt, "siglip", "qwen2", *extra)
    if targets == "with_head":
        assert any("lm_head" in n and "lora_" in n for n, _ in model.named_parameters())
    batch = collate(three_samples(model.layout))
    model.train()
    results = []
    for logits_at in ("all", "labels"):
        model.zero_grad(set_to_none=True)
        out = model(batch, loss_normalizer=7.0, logits_at=logits_at)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (lean, lean_grads) = results
    where = batch["labels"][:, 1:] != IGNORE_INDEX  # position p predicts label p + 1
    assert full.logits.shape[1] == batch["input_ids"].shape[1] and lean.logits.shape[:2] == (1, int(where.sum()))
    assert int(where.sum()) < int(where.any(0).sum()) * where.shape[0]  # fewer than the union over rows
    torch.testing.assert_close(lean.logits[0], full.logits[:, :-1][where])
    torch.testing.assert_close(lean.loss, full.loss)
    assert full_grads.keys() == lean_grads.keys() and len(full_grads) > 10
    for name, g in full_grads.items():
        torch.testing.assert_close(lean_grads[name], g, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="logits_at"):
        model(batch, logits_at="some")


def test_float32_masters_keep_small_updates_that_bf16_weights_round_away(ckpt):
    """model.dtype=bfloat16 with fully trained modules: training builds every trainable parameter in float32
    (frozen ones stay bf16) and computes under bf16 autocast; an update of 1e-4 of a weight survives the step,
    where on bf16 weights (8-bit mantissa) it is rounded away."""
    from refvllm.model.build import build_model

    def updated_fraction(masters: bool) -> tuple[float, object]:
        cfg = load_config(None, [f"model.vision_path={ckpt['siglip']}", f"model.llm_path={ckpt['qwen2']}",
                                 "model.dtype=bfloat16", "model.train_llm=full", "model.train_vision=full",
                                 "model.region.max_tokens=2"])
        torch.manual_seed(0)
        model = build_model(cfg.model, print_table=False, float32_masters=masters).train()
        weight = model.llm.get_output_embeddings().weight
        before = weight.detach().float().clone()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(collate(three_samples(model.layout))).loss
        loss.backward()
        with torch.no_grad():  # a step of exactly 1e-4 x |w| in the gradient's direction, for every weight
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.copy_(torch.sign(p.grad.float()) * 1e-4 * p.detach().float().abs())
        optimizer.step()
        changed = (weight.detach().float() != before) & (before != 0) & (weight.grad.float() != 0)
        moved = (weight.grad.float() != 0) & (before != 0)
        return float(changed.sum() / moved.sum()), model

    fraction, model = updated_fraction(masters=True)
    counts = parameter_counts(model)
    assert counts["llm"]["dtypes"] == "float32" and counts["vision"]["dtypes"] == "float32"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert fraction > 0.99
    fraction_bf16, plain = updated_fraction(masters=False)
    assert parameter_counts(plain)["llm"]["dtypes"] == "bfloat16" and fraction_bf16 < 0.05
    frozen = make_model(ckpt, "siglip", "qwen2", "model.dtype=bfloat16")  # LoRA: adapters fp32, base bf16
    assert parameter_counts(frozen)["llm"]["dtypes"] == "float32 trainable, bfloat16 frozen"
