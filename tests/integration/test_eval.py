"""``refvllm eval`` end to end on a tiny trained checkpoint: seed (synthetic), Bench-Q and Bench-D files.

The checkpoint has seen one training step, so its answers are not meaningful; these tests check what the
evaluation does with them: every entry accounted for, scores consistent with the predictions, modes reaching
the model input, the judge wired to an OpenAI-compatible server, files and output in their documented places.
"""

import json
from pathlib import Path

import pytest
from eval_helpers import GOOD_JUDGE, StubJudge, train_tiny_checkpoint, write_bench_files

from refvllm.cli import main as cli
from refvllm.eval.formats import CHOICE_INSTRUCTION, read_eval_file
from refvllm.eval.report import predictions_path
from refvllm.eval.run import PromptDataset
from refvllm.infer import RefInference

pytestmark = pytest.mark.slow  # a module fixture trains a tiny model (~5 s); each test loads it (~1 s)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    checkpoint, assets = train_tiny_checkpoint(tmp_path_factory.getbasetemp())
    bench_q, bench_d = write_bench_files(root)
    return {"root": root, "checkpoint": checkpoint, "data_root": assets["data.data_root"],
            "eval_file": assets["eval_file"], "bench_q": bench_q, "bench_d": bench_d}


def _eval(capsys, *args):
    code = cli(["eval", "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _records(metrics_path):
    return [json.loads(line) for line in predictions_path(metrics_path).read_text().splitlines()]


def test_seed_format_on_synthetic_eval_with_a_bad_sample(run, tmp_path, capsys):
    samples = json.loads(Path(run["eval_file"]).read_text())
    bad = dict(samples[0], id="broken", video="videos/missing.mp4")
    bad.pop("image", None)
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([*samples, bad]))
    out = tmp_path / "out" / "metrics.json"
    code, stdout, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", data, "--data-root",
                                 run["data_root"], "--out", out)
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(out)  # the metrics path is printed last
    assert "OVERALL" in stdout and "bad sample 4 (id 'broken')" in stderr
    metrics = json.loads(out.read_text())
    assert metrics["overall"]["n"] == len(samples) and metrics["overall"]["num_bad"] == 1
    assert metrics["bad_samples"][0]["id"] == "broken" and "not found" in metrics["bad_samples"][0]["reason"]
    assert metrics["run"]["num_frames"] == 8 and metrics["run"]["mode"] == "multi"
    assert metrics["run"]["generation"]["do_sample"] is False
    records = _records(out)
    assert [r["id"] for r in records] == [s["id"] for s in samples] + ["broken"]
    assert "error" in records[-1] and "prediction" not in records[-1]
    for sample in samples:
        per_type = metrics["per_type"][sample["type"]]
        assert per_type["chance"] == pytest.approx(sample["chance"])
        assert per_type["needs_region"] is sample["needs_region"]
    for qtype, m in metrics["per_type"].items():
        graded = [r["correct"] for r in records if r.get("type") == qtype and "prediction" in r]
        assert m["n"] == len(graded) and m["accuracy"] == pytest.approx(sum(graded) / len(graded))


def test_ablate_regions_and_overrides_are_recorded(run, tmp_path, capsys):
    out = tmp_path / "ablated.json"
    code, _, stderr = _eval(capsys, "--model", run["checkpoint"].parent, "--data", run["eval_file"], "--out", out,
                            "--ablate-regions", "eval.max_new_tokens=2", "eval.batch_size=3")
    assert code == 0, stderr
    assert f"using the newest checkpoint of {run['checkpoint'].parent}: {run['checkpoint']}" in stderr
    metrics = json.loads(out.read_text())
    assert metrics["run"]["ablate_regions"] is True and metrics["run"]["batch_size"] == 3
    assert metrics["run"]["generation"]["max_new_tokens"] == 2
    assert all(r["num_tokens"] <= 2 for r in _records(out))


def test_bench_q_single_and_multi(run, tmp_path, capsys):
    for mode in ("single", "multi"):
        out = tmp_path / mode / "metrics.json"
        code, _, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", run["bench_q"], "--out", out,
                                "--format", "bench-q", "--mode", mode)
        assert code == 0, stderr
        metrics = json.loads(out.read_text())
        assert metrics["run"]["mode"] == mode
        assert metrics["per_type"]["Basic Questions"]["n"] == 2
        assert metrics["per_type"]["Sequential Questions"]["chance"] == 0.5
        assert metrics["per_type"]["Basic Questions"]["chance"] == pytest.approx((0.25 + 0.5) / 2)
        records = _records(out)
        assert all(r["kind"] == "choice" and r["question"].endswith(CHOICE_INSTRUCTION) for r in records)
        assert [r["Answer"] for r in records] == ["(A) red", "(B) right", "(A) yes"]


def test_bench_q_mode_reaches_the_model_input(run):
    engine = RefInference.from_pretrained(run["checkpoint"])
    root = run["bench_q"].parent
    single = PromptDataset(read_eval_file(run["bench_q"], "bench-q", "single"), engine.processor, root)[0]
    multi = PromptDataset(read_eval_file(run["bench_q"], "bench-q", "multi"), engine.processor, root)[0]
    assert single["region_masks"].shape[0] == 1  # the mask at frame_idx only
    assert multi["region_masks"].shape[0] == 8  # all 8 annotated frames, each one of the 8 planned frames
    assert single["pixel_values"].shape[0] == multi["pixel_values"].shape[0] == 8  # training's frame count


def test_bench_d_without_and_with_judge(run, tmp_path, capsys):
    out = tmp_path / "d" / "metrics.json"
    code, _, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", run["bench_d"], "--out", out,
                            "--format", "bench-d")
    assert code == 0, stderr
    assert "judge: off" in stderr
    metrics = json.loads(out.read_text())
    assert metrics["judge"]["enabled"] is False and "eval.judge_endpoint" in metrics["judge"]["message"]
    records = _records(out)
    assert [r["caption"] for r in records] == ["A red square slides to the right.", "A small red box moves right."]
    assert all("pred" in r for r in records)

    with StubJudge(GOOD_JUDGE) as judge:
        out = tmp_path / "dj" / "metrics.json"
        code, stdout, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", run["bench_d"], "--out", out,
                                     "--format", "bench-d", "--mode", "single", f"eval.judge_endpoint={judge.endpoint}",
                                     "eval.judge_model=stub-judge", "eval.judge_temperature=0.3")
    assert code == 0, stderr
    metrics = json.loads(out.read_text())
    assert metrics["judge"]["model"] == "stub-judge" and metrics["judge"]["temperature"] == 0.3
    assert metrics["judge"]["n_scored"] == 2 and metrics["judge"]["scores"]["appearance"] == 3.0
    assert metrics["judge"]["average"] == pytest.approx(3.5)
    assert len(judge.requests) == 2 and judge.requests[0]["model"] == "stub-judge"
    assert "A red square slides to the right." in judge.requests[0]["messages"][1]["content"]
    assert all(r["judge"]["temporal"] == 2.0 for r in _records(out))
    assert "judge (stub-judge" in stdout


def test_user_errors_exit_1_without_traceback(run, tmp_path, capsys):
    code, _, err = _eval(capsys, "--model", run["checkpoint"], "--data", tmp_path / "nope.json", "--out",
                         tmp_path / "m.json")
    assert code == 1 and "does not exist" in err and "Traceback" not in err
    code, _, err = _eval(capsys, "--model", tmp_path, "--data", run["eval_file"], "--out", tmp_path / "m.json")
    assert code == 1 and "neither a complete training checkpoint nor an export" in err
    code, _, err = _eval(capsys, "--model", run["checkpoint"], "--data", run["eval_file"], "--out",
                         tmp_path / "m.json", "eval.batch_sise=2")
    assert code == 1 and "did you mean 'eval.batch_size'" in err


def test_bench_q_headline_uses_the_published_rule_with_refvllm_s_beside_it(run, tmp_path, capsys):
    out = tmp_path / "q" / "metrics.json"
    code, stdout, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", run["bench_q"], "--out", out,
                                 "--format", "bench-q")
    assert code == 0, stderr
    metrics = json.loads(out.read_text())
    assert metrics["run"]["choice_rule"] == "videorefer"
    assert metrics["scoring"]["accuracy"].startswith("videorefer: the published VideoRefer-Bench-Q scorer")
    assert metrics["scoring"]["accuracy_refvllm"].startswith("refvllm: ")
    records = _records(out)
    for key in ("accuracy_videorefer", "accuracy_refvllm"):
        rule = key.removeprefix("accuracy_")
        assert metrics["overall"][key] == pytest.approx(sum(r[f"correct_{rule}"] for r in records) / len(records))
    assert metrics["overall"]["accuracy"] == metrics["overall"]["accuracy_videorefer"]
    assert all(r["correct"] is r["correct_videorefer"] for r in records)
    header = stdout.splitlines()[0].split()
    assert header[3:5] == ["acc%", "acc%(refvllm)"]


def test_prompt_and_frame_settings_come_from_the_checkpoint_and_changes_warn(run, tmp_path, capsys):
    out = tmp_path / "p" / "metrics.json"
    code, _, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", run["bench_q"], "--out", out,
                            "--format", "bench-q", "data.prompt.choice_instruction=Reply with one letter.",
                            "data.num_frames=4")
    assert code == 0, stderr
    assert "warning: data.prompt.choice_instruction is 'Reply with one letter.' here but" in stderr
    assert "warning: data.num_frames is 4 here but 8 in training" in stderr
    assert all(r["question"].endswith("\nReply with one letter.") for r in _records(out))
    metrics = json.loads(out.read_text())
    assert metrics["run"]["prompt"]["choice_instruction"] == "Reply with one letter."
    assert metrics["run"]["frames"]["data.num_frames"] == 4
    code, _, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", run["bench_q"], "--out", out,
                            "--format", "bench-q")
    assert code == 0 and "warning:" not in stderr  # the checkpoint's own settings: nothing to warn about


def _eval_process(args: list[str], nproc: int = 1, env: dict | None = None):
    """scripts/eval.py in a subprocess (torchrun with ``nproc`` > 1): the CompletedProcess, output merged."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                **(env or {})}
    return subprocess.run([*launcher, str(root / "scripts" / "eval.py"), "--no-progress", *map(str, args)], cwd=root,
                          env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def _without_run(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "run"}


def test_two_processes_and_a_resumed_run_write_what_one_process_writes(run, tmp_path, capsys):
    """The questions in batches of 1 (4 batches): 2 gloo processes take 2 each; a run SIGKILLed after its first
    batch continues from its part file. Both write the one-process run's predictions and metrics."""
    from refvllm.eval.shards import KILL_AFTER_BATCHES_ENV

    args = ["--model", run["checkpoint"], "--data", run["eval_file"], "--data-root", run["data_root"]]
    one = tmp_path / "one" / "metrics.json"
    code, _, stderr = _eval(capsys, *args, "--out", one, "eval.batch_size=1")
    assert code == 0, stderr
    two = tmp_path / "two" / "metrics.json"
    proc = _eval_process([*args, "--out", two, "eval.batch_size=1"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("OVERALL") == 1  # one table, from the main process
    metrics_one, metrics_two = json.loads(one.read_text()), json.loads(two.read_text())
    assert metrics_two["run"]["num_processes"] == 2 and metrics_two["run"]["batches"] == 4
    assert _without_run(metrics_two) == _without_run(metrics_one)
    assert predictions_path(two).read_text() == predictions_path(one).read_text()
    assert not list(two.parent.glob("*.part-*.jsonl"))  # removed once the results are written

    resumed = tmp_path / "resumed" / "metrics.json"
    proc = _eval_process([*args, "--out", resumed, "eval.batch_size=1"], env={KILL_AFTER_BATCHES_ENV: "1"})
    assert proc.returncode == -9, proc.stdout[-3000:]
    (part,) = resumed.parent.glob("metrics.part-*.jsonl")
    assert len(part.read_text().splitlines()) == 1 and not resumed.exists()
    code, _, stderr = _eval(capsys, *args, "--out", resumed, "eval.batch_size=1")
    assert code == 0, stderr
    assert "resuming: 1 of 4 batches already answered" in stderr
    metrics = json.loads(resumed.read_text())
    assert metrics["run"]["batches_resumed"] == 1 and _without_run(metrics) == _without_run(metrics_one)
    assert predictions_path(resumed).read_text() == predictions_path(one).read_text()

    assert not part.exists()
    part.write_text('{"key": "0123456789abcdef", "batch": 0, "results": []}\n')  # left by another evaluation
    code, _, stderr = _eval(capsys, *args, "--out", resumed, "eval.batch_size=1")
    assert code == 1 and "holds answers of another evaluation" in stderr and "Traceback" not in stderr


def test_region_captioning_format_is_scored_by_bleu_rouge_and_cider(run, tmp_path, capsys):
    from refvllm.eval.captioning import caption_metrics

    entries = [
        {"id": "box", "video": "clips/c0", "captions": ["A red square slides right.", "A red box moves right."],
         "boxes": [{"0": [0, 24, 16, 40], "8": [8, 24, 24, 40], "16": [16, 24, 32, 40]}], "type": "action"},
        {"id": "mask", "video": "clips/c0", "caption": "A red square moves to the right.",
         "annotation": json.loads(run["bench_d"].read_text())[0]["annotation"]},
        {"id": "bad", "video": "clips/c0", "caption": "No objects."},
    ]
    data = run["bench_q"].parent / "captions.json"
    data.write_text(json.dumps(entries))
    out = tmp_path / "cap" / "metrics.json"
    code, stdout, stderr = _eval(capsys, "--model", run["checkpoint"], "--data", data, "--out", out,
                                 "--format", "caption")
    assert code == 0, stderr
    metrics = json.loads(out.read_text())
    records = _records(out)
    answered = [r for r in records if "prediction" in r]
    assert [r["id"] for r in answered] == ["box", "mask"] and "error" in records[2]
    expected = caption_metrics([r["prediction"] for r in answered], [r["captions"] for r in answered])
    assert {k: metrics["captioning"]["overall"][k] for k in expected} == expected
    assert metrics["captioning"]["overall"]["coverage"] == pytest.approx(2 / 3)
    assert set(metrics["captioning"]["per_type"]) == {"action", "description"}
    assert "captioning: BLEU-4=" in stdout and "coverage=66.7%" in stdout
