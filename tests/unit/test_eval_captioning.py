"""Region captioning: the caption format (boxes or masks, several references) and BLEU-4 / ROUGE-L / CIDEr-D."""

import pytest

from refvllm.eval.captioning import bleu4, caption_metrics, cider_d, rouge_l, tokenize
from refvllm.eval.formats import BadEntry, to_entry

PREDICTIONS = ["a man in a red shirt walks to the left", "the woman sits down on the chair", "a dog runs",
               "he picks up the cup and drinks"]
REFERENCES = [["a man wearing a red shirt walks left", "the man in red walks to the left side"],
              ["the woman sits on a chair"], ["a brown dog runs across the grass quickly"],
              ["the man drinks from a cup"]]


def test_metrics_equal_pycocoevalcap_on_the_same_tokens():
    # Reference values: pycocoevalcap 1.2's Bleu(4), Rouge() and Cider() on these captions, tokenised as here
    # (computed once outside the suite, which does not depend on pycocoevalcap or Java).
    m = caption_metrics(PREDICTIONS, REFERENCES)
    assert m["n"] == 4
    assert m["bleu4"] == pytest.approx(0.3138693574168153, abs=1e-12)
    assert m["rouge_l"] == pytest.approx(0.5974710350139812, abs=1e-12)
    assert m["cider"] == pytest.approx(2.6114130564712035, abs=1e-9)


def test_metric_edge_cases():
    tokens = [tokenize(p) for p in PREDICTIONS]
    refs = [[t] for t in tokens]
    # Every caption its own only reference: 10 each, but "a dog runs" has no 4-gram, so its 4-gram term is 0
    # (as in pycocoevalcap): (10 + 10 + 7.5 + 10) / 4.
    assert cider_d(tokens, refs) == pytest.approx(9.375)
    assert bleu4(tokens, refs) == pytest.approx(1.0)
    assert rouge_l(tokenize("the dog"), [tokenize("the dog")]) == pytest.approx(1.0)
    assert rouge_l([], [tokenize("the dog")]) == 0.0 and bleu4([["x"]], [[["y"]]]) < 1e-3
    assert tokenize("The man's LEFT-hand, ok.") == ["the", "man", "s", "left", "hand", "ok"]
    assert caption_metrics([], []) == {"n": 0, "bleu4": None, "rouge_l": None, "cider": None}


def test_caption_entries_take_boxes_or_masks_and_several_references():
    entry = to_entry({"id": "c1", "video": "v.mp4", "captions": ["a man walks", "someone walks"],
                      "boxes": [{"0": [10, 20, 50, 80], "4": [12, 20, 52, 80]}], "type": "action"}, 0, "caption",
                     "multi")
    assert entry.reference == "a man walks" and entry.extra["captions"] == ["a man walks", "someone walks"]
    assert entry.type == "action" and entry.raw["annotation"] == [
        {"0": {"segmentation": [[10.0, 20.0, 50.0, 20.0, 50.0, 80.0, 10.0, 80.0]]},
         "4": {"segmentation": [[12.0, 20.0, 52.0, 20.0, 52.0, 80.0, 12.0, 80.0]]}}]
    assert entry.raw["conversations"][0]["value"].startswith("<video>\nPlease give a detailed description")
    image = to_entry({"image": "i.jpg", "caption": "a cat", "question": "What is <region> doing?",
                      "annotation": [{"0": {"segmentation": [[0, 0, 4, 0, 4, 4]]}}]}, 1, "caption", "multi")
    assert image.raw["image"] == "i.jpg"
    assert image.raw["conversations"][0]["value"] == "<image>\nWhat is <region> doing?"
    assert image.type == "description"
    single = to_entry({"video": "v.mp4", "caption": "x", "frame_idx": 4,
                       "boxes": [{"0": [1, 1, 5, 5], "4": [2, 2, 6, 6]}]}, 2, "caption", "single")
    assert list(single.raw["annotation"][0]) == ["4"]


@pytest.mark.parametrize("record, reason", [
    ({"video": "v.mp4", "caption": "x"}, "'annotation' or as 'boxes'"),
    ({"video": "v.mp4", "caption": "", "boxes": [{"0": [1, 1, 5, 5]}]}, "non-empty string"),
    ({"video": "v.mp4", "captions": [], "boxes": [{"0": [1, 1, 5, 5]}]}, "non-empty list"),
    ({"video": "v.mp4", "caption": "x", "boxes": [{"0": [5, 1, 1, 5]}]}, "x2 > x1"),
    ({"video": "v.mp4", "caption": "x", "boxes": [{"0": [1, 1, "5", 5]}]}, "[x1, y1, x2, y2]"),
    ({"video": "v.mp4", "caption": "x", "question": "Describe it.", "boxes": [{"0": [1, 1, 5, 5]}]},
     "one <region> per object"),
    ({"caption": "x", "boxes": [{"0": [1, 1, 5, 5]}]}, "'image'"),
])
def test_bad_caption_entries_are_reported_with_their_reason(record, reason):
    bad = to_entry(record, 7, "caption", "multi")
    assert isinstance(bad, BadEntry) and reason in bad.reason and bad.type == "description"
