"""`refvllm validate` on a file mixing valid and malformed samples with real media: exact rows, summary, exit codes."""

import json
import os

import numpy as np
import pytest
from helpers_media import (
    box_mask,
    box_polygon,
    image_sample,
    indexed_frames,
    rle,
    uncompressed_rle,
    video_sample,
    write_frame_folder,
    write_image,
    write_video,
)

from refvllm import cli
from refvllm.data import validate as validate_module

H, W = 48, 64
A = box_mask(H, W, 4, 12, 4, 20)  # 128 px
B = box_mask(H, W, 30, 40, 40, 60)  # 200 px
HALF = box_mask(H // 2, W // 2, 2, 6, 2, 10)  # 32 px at 24x32 -> 128 px at 48x64


def _q(n):
    return "<video>\n" + " and ".join(["<region>"] * n) + "?"


# (raw sample, expected ok, category, kind, num_regions, mask_frames, mask_area)
CASES = [
    (video_sample("v.mp4", [{3: rle(A)}], sample_id=0), True, None, "video_referring", 1, [[3]], [{"3": 128}]),
    (video_sample("frames", [{0: uncompressed_rle(A), 5: None, 7: rle(B)}, {"2": box_polygon(30, 40, 40, 60)}],
                  sample_id="multi"),
     True, None, "video_referring", 2, [[0, 7], [2]], [{"0": 128, "7": 200}, {"2": 200}]),
    (image_sample("img.jpg", [rle(B)], sample_id="img"), True, None, "image_referring", 1, [[0]], [{"0": 200}]),
    (video_sample("img.jpg", [{0: box_polygon(4, 12, 4, 20)}], sample_id="vkey"),
     True, None, "image_referring", 1, [[0]], [{"0": 128}]),
    (video_sample("v.mp4", sample_id="understand"), True, None, "video", 0, [], []),
    (image_sample("img.jpg", sample_id="img-only"), True, None, "image", 0, [], []),
    (video_sample("v.mp4", [{3: rle(HALF)}], sample_id="half"), True, None, "video_referring", 1, [[3]],
     [{"3": 128}]),
    (video_sample("missing.mp4", [{3: rle(A)}], sample_id="nomedia"), False, "media_not_found",
     "video_referring", 1, [[3]], None),
    (video_sample("corrupt.mp4", sample_id="corrupt"), False, "media_corrupt", "video", 0, [], None),
    (video_sample("v.mp4", [{3: {"size": [H, W], "counts": rle(A)["counts"][:-2]}}], sample_id="badrle"),
     False, "rle_malformed", "video_referring", 1, [[3]], None),
    (video_sample("v.mp4", [{3: rle(np.ones((10, 10), bool))}], sample_id="size"), False, "mask_size",
     "video_referring", 1, [[3]], None),
    (video_sample("v.mp4", [{3: rle(A)}], question=_q(2), sample_id="regions"), False, "region_count",
     None, None, None, None),
    (video_sample("v.mp4", [{3: rle(A)}, {40: rle(B)}], sample_id="past"), False, "frame_index",
     "video_referring", 2, [[3], [40]], None),
    (video_sample("v.mp4", [{3: rle(np.zeros((H, W), bool))}], sample_id="empty"), False, "empty_mask",
     "video_referring", 1, [[3]], None),
    ({**video_sample("v.mp4"), "image": "img.jpg", "id": "both"}, False, "both_media", None, None, None, None),
    (video_sample("../v.mp4", sample_id="escape"), False, "media_path", None, None, None, None),
    ({**video_sample("v.mp4", sample_id="speaker"),
      "conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "a"}]},
     False, "unknown_speaker", None, None, None, None),
]
BROKEN_LINE = 7  # a JSONL line that is not JSON is inserted before this case


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    frames = indexed_frames(12, H, W)
    write_video(root / "v.mp4", frames)
    write_frame_folder(root / "frames", frames[:8])
    write_image(root / "img.jpg", frames[0])
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    lines = [json.dumps(case[0]) for case in CASES]
    lines.insert(BROKEN_LINE, '{"id": "broken", "video": ')
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    (root / "good.json").write_text(json.dumps([case[0] for case in CASES if case[1]]))
    return root


def _expected_rows():
    rows = []
    for raw, ok, category, kind, regions, frames, area in CASES:
        rows.append({"id": str(raw["id"]), "ok": ok, "category": category, "kind": kind, "num_regions": regions,
                     "mask_frames": frames, "mask_area": area})
    rows.insert(BROKEN_LINE, {"id": None, "ok": False, "category": "json_syntax", "kind": None,
                              "num_regions": None, "mask_frames": None, "mask_area": None})
    for i, row in enumerate(rows):
        row["index"] = i
    return rows


def _run(argv, capsys):
    code = validate_module.main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("workers", [1, 2])
def test_mixed_file_reports_exactly_which_samples_are_bad(data, tmp_path, capsys, workers):
    report = tmp_path / "report.jsonl"
    code, out = _run([data / "mixed.jsonl", "--report", report, "--workers", workers,
                      "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 1
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    keys = ["index", "id", "ok", "category", "kind", "num_regions", "mask_frames", "mask_area"]
    assert [{k: r[k] for k in keys} for r in rows] == _expected_rows()
    for row in rows:
        assert (row["error"] is None) == row["ok"]
    assert rows[6]["warnings"] and "24x32 differs from the media's 48x64" in rows[6]["warnings"][0]
    assert "mask frame 40 is past the end of the media (12 frames" in rows[13]["error"]
    assert "validated 18 samples" in out.out and "7 valid, 11 invalid" in out.out
    assert "video_referring  8 (5 invalid)" in out.out and "unparsed         5 (5 invalid)" in out.out
    assert "rle_malformed" in out.out and "sample 10 (id 'badrle')" in out.out


def test_all_valid_json_array_exits_0(data, tmp_path, capsys):
    code, out = _run([data / "good.json", "--data-root", data, "--workers", 1, "--cache-dir", tmp_path], capsys)
    assert code == 0 and "7 valid, 0 invalid" in out.out


def test_cli_entry_point(data, tmp_path, capsys):
    assert cli.main(["validate", str(data / "good.json"), "--workers", "1", "--cache-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("argv_tail", [
    ["--workers", "0"],
    ["--data-root", "/nonexistent/folder"],
    ["--config", "/nonexistent/config.yaml"],
    ["--bogus-flag"],
])
def test_usage_errors_exit_2(data, capsys, argv_tail):
    code, out = _run([data / "good.json", *argv_tail], capsys)
    assert code == 2 and out.err


def test_missing_data_file_exits_2_and_broken_array_exits_1(tmp_path, capsys):
    code, out = _run([tmp_path / "nope.json"], capsys)
    assert code == 2 and "not found" in out.err
    (tmp_path / "bad.json").write_text('[{"id": 1}, {"id": ]')
    code, out = _run([tmp_path / "bad.json", "--cache-dir", tmp_path], capsys)
    assert code == 1 and "not a valid JSON array" in out.err and "byte" in out.err


def test_a_crashing_worker_is_isolated_and_reported(data, tmp_path, capsys, monkeypatch):
    real = validate_module.check_sample

    def crash_on_3(index, i, settings, processor=None):
        if i == 3:
            os._exit(1)  # what a segfault in a decoder looks like to the pool
        return real(index, i, settings, processor)

    monkeypatch.setattr(validate_module, "check_sample", crash_on_3)  # inherited by forked workers
    report = tmp_path / "r.jsonl"
    code, _ = _run([data / "good.json", "--workers", 2, "--report", report, "--cache-dir", tmp_path], capsys)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert code == 1 and [r["index"] for r in rows] == list(range(7))
    assert [r["ok"] for r in rows] == [True, True, True, False, True, True, True]
    assert rows[3]["category"] == "worker_crash" and rows[3]["id"] == "vkey"


@pytest.mark.slow
def test_config_checks_length_with_the_processor(data, tmp_path_factory, capsys):
    """With --config, samples whose expanded length exceeds data.max_length are invalid ('too_long')."""
    from refvllm.model.tiny import write_tiny_checkpoints

    tmp = tmp_path_factory.mktemp("cfg")
    paths = write_tiny_checkpoints(str(tmp / "tiny"), seed=0)
    # tiny vision: 64 px, 8 px patches, pooled 2x2 -> 16 tokens per frame; a 4-frame video needs 64 positions
    config = tmp / "cfg.yaml"
    config.write_text(f"data:\n  num_frames: 4\n  max_length: 60\nmodel:\n  vision_path: {paths['vision']}\n"
                      f"  llm_path: {paths['llm']}\n")
    report = tmp / "r.jsonl"
    code, out = _run([data / "good.json", "--config", config, "--workers", 1, "--report", report,
                      "--cache-dir", tmp], capsys)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert code == 1
    video_rows = [r for r in rows if r["kind"].startswith("video")]
    image_rows = [r for r in rows if r["kind"].startswith("image")]
    assert video_rows and all(not r["ok"] and r["category"] == "too_long" for r in video_rows)
    assert image_rows and all(r["ok"] for r in image_rows)
    assert "max_length 60" in video_rows[0]["error"]


def test_report_that_cannot_be_written_is_a_usage_error(data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for report, words in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "r.jsonl", "cannot be written")):
        code, out = _run([data / "good.json", "--report", report, "--workers", 1], capsys)
        assert code == 2 and words in out.err and "Traceback" not in out.err


@pytest.mark.parametrize("text", ["", "\n\n", "[]", " [ ] "])
def test_a_data_file_without_samples_fails(tmp_path, capsys, text):
    (tmp_path / "e.json").write_text(text)
    code, out = _run([tmp_path / "e.json", "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 1 and "has no samples" in out.err


def test_text_the_terminal_cannot_encode_is_escaped(data, tmp_path):
    """Under an ASCII-only stdout, a summary quoting non-ASCII (and surrogate-escaped) text prints escapes."""
    import subprocess
    import sys

    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(video_sample("vidéo_漢字.mp4", sample_id="é")) + "\n"
                    + json.dumps(video_sample("v\udc00.mp4", sample_id="\ud83d")) + "\n")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run([sys.executable, "-m", "refvllm", "validate", str(path), "--data-root", str(data),
                           "--workers", "1", "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True,
                          env=env, encoding="ascii", errors="strict", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "vid\\xe9o_\\u6f22\\u5b57.mp4" in proc.stdout and "text_encoding" in proc.stdout
