"""The training loop: one explicit accelerate loop in short functions (setup, resume, fit, train_step, save).

    refvllm train --config CFG [key=value ...]          (also: python scripts/train.py / accelerate launch ...)

One optimizer step = ``train.grad_accum`` micro-batches of ``train.micro_batch_size`` samples on every process.
The loss of each micro-batch is its summed token loss divided by the number of label tokens of the WHOLE step
(all micro-batches, all processes), so a step's gradient is the token-mean over the global batch whatever the
split into micro-batches and processes. Checkpoints, resume and the data order are described in
docs/training.md; checkpoint files in :mod:`refvllm.train.checkpoint`.

Test hook: with the environment variable ``REFVLLM_TEST_KILL_AFTER_SAVE=N`` every process kills itself with
SIGKILL right after checkpoint N is complete (the kill-and-resume test uses it; nothing else should).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from refvllm import checkpoint as fmt
from refvllm.config import Config, dump_yaml, load_config
from refvllm.errors import ConfigError
from refvllm.train import checkpoint as ckpt
from refvllm.train.distributed import (
    all_reduce_sum,
    describe_strategy,
    gather_lists,
    gathered,
    is_deepspeed,
    is_fsdp,
    load_optimizer_state,
    make_accelerator,
    optimizer_state,
    prepare_deepspeed_plugin,
    prepare_fsdp_plugin,
)
from refvllm.train.metrics import LOSS_CURVE_FILE, MetricsWriter, plot_loss_curve
from refvllm.train.schedule import build_optimizer, build_scheduler

KILL_AFTER_SAVE_ENV = "REFVLLM_TEST_KILL_AFTER_SAVE"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@dataclass
class Run:
    """Everything the loop works on. ``model``/``optimizer`` are the accelerate-prepared objects; ``raw``
    is the unwrapped RefVLM (for saving and loading weights)."""

    cfg: Config
    accelerator: Any
    raw: Any
    model: Any
    optimizer: Any
    scheduler: Any
    sampler: Any
    loader: Any
    bad: Any
    state: ckpt.TrainerState
    metrics: MetricsWriter | None = None
    consumed: int = 0  # micro-batches this process took from the loader since it started (resume: since there)
    resumed_from: Path | None = None
    elastic: bool = False  # resumed on another process count (exact in data, not bitwise: _check_resumable)
    trainable: list = field(default_factory=list)
    dummy_batch: dict | None = None  # stands in for a micro-batch whose samples were all skipped


# -------------------------------------------------------------------------------------------------- setup


def prepare_assets(cfg: Config, accelerator) -> None:
    """Make on first use what the config names and is missing: synthetic data (``data.synth.enabled``) and tiny
    checkpoints (``model.tiny``). The main process makes them; the others wait."""
    if accelerator.is_main_process:
        synth = cfg.data.synth
        if synth.enabled and not Path(cfg.data.train_file).is_file():
            from refvllm.data.synthetic import generate

            print(f"making synthetic data in {synth.out_dir} ({synth.num_train} train, {synth.num_eval} eval)")
            files = generate(synth.out_dir, synth.num_train, synth.num_eval, synth.seed)
            if Path(files.train_file).resolve() != Path(cfg.data.train_file).resolve():
                raise ConfigError(f"data.train_file '{cfg.data.train_file}' is not the synthetic train file "
                                  f"'{files.train_file}' (data.synth.out_dir)")
        if cfg.model.tiny:
            from refvllm.model.build import ensure_tiny_checkpoints

            ensure_tiny_checkpoints(cfg.model)
    accelerator.wait_for_everyone()
    if not Path(cfg.data.train_file).is_file():
        raise ConfigError(f"data.train_file '{cfg.data.train_file}' does not exist")


def build_data(cfg: Config, accelerator, seed_generator: torch.Generator):
    """Processor, dataset, resumable sampler and data loader of this process.

    The loader gets its own generator so that creating its iterator never draws from the global torch RNG
    (the RNG stream of training must not depend on when the loader was started)."""
    from refvllm.data.dataset import BadSampleCounter, RefDataset, ResumableSampler
    from refvllm.families import make_processor

    processor = make_processor(cfg)
    dataset = RefDataset.from_config(cfg, processor)
    t, lengths = cfg.train, None
    if t.max_tokens or t.group_by_length:
        from refvllm.data.lengths import sample_lengths

        with accelerator.main_process_first():  # one process tokenises the file; the others read its cache
            lengths = sample_lengths(dataset, log=print if accelerator.is_main_process else _quiet)
    sampler = ResumableSampler(len(dataset), t.seed, t.micro_batch_size, num_replicas=accelerator.num_processes,
                               rank=accelerator.process_index, lengths=lengths, max_tokens=t.max_tokens,
                               group_by_length=t.group_by_length)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=processor.collator(),
                                         num_workers=cfg.data.num_workers, generator=seed_generator,
                                         pin_memory=torch.cuda.is_available())
    return processor, dataset, sampler, loader, BadSampleCounter(cfg.data.max_bad_samples)


def _quiet(*_args) -> None:
    pass


def make_dummy_batch(processor) -> dict:
    """The batch of :meth:`Processor.dummy_item`: stands in for a micro-batch whose samples were all skipped."""
    return processor.collate([processor.dummy_item()])


def setup(cfg: Config) -> Run:
    """Accelerator, assets, model, optimizer, scheduler, data; then resume when ``train.resume`` says so."""
    from accelerate.utils import set_seed

    from refvllm.model.build import build_model, parameter_groups

    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if main:
        print("resolved config:\n" + dump_yaml(cfg), flush=True)
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_stale_tmp(cfg.train.output_dir)
        if removed:
            print(f"removed incomplete checkpoint directories: {', '.join(removed)}")
    prepare_assets(cfg, accelerator)
    resume_from = ckpt.resolve_resume(cfg.train.resume, cfg.train.output_dir)
    if main and resume_from is None and fmt.list_checkpoints(cfg.train.output_dir):
        print(f"warning: starting a fresh run in {cfg.train.output_dir}, which holds checkpoints of an earlier run "
              "(they may be replaced or rotated away); use train.resume=auto to continue it", flush=True)
    set_seed(cfg.train.seed)  # the same initial weights on every process
    # DeepSpeed keeps float32 masters of what it trains itself (and its parameters may be partitioned already).
    raw = build_model(cfg.model, print_table=main, float32_masters=not is_deepspeed(accelerator))
    optimizer = build_optimizer(parameter_groups(raw), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    processor, _, sampler, loader, bad = build_data(cfg, accelerator, torch.Generator().manual_seed(cfg.train.seed))
    state = ckpt.TrainerState(world_size=accelerator.num_processes, micro_batch_size=cfg.train.micro_batch_size,
                              grad_accum=cfg.train.grad_accum)
    run = Run(cfg, accelerator, raw, raw, optimizer, scheduler, sampler, loader, bad, state, resumed_from=resume_from,
              dummy_batch=make_dummy_batch(processor))
    if resume_from is not None:
        load_checkpoint_state(run, resume_from)
    prepare_deepspeed_plugin(accelerator, cfg)
    prepare_fsdp_plugin(accelerator, raw)
    run.model, run.optimizer = accelerator.prepare(raw, optimizer)
    if main:
        print(f"distributed: {describe_strategy(accelerator, run.model)}", flush=True)
    if resume_from is not None and is_fsdp(accelerator):  # sharded now: its state is sharded the same way
        load_optimizer_state(accelerator, run.model, run.optimizer, _optimizer_file(resume_from), resume_from)
    if resume_from is not None and is_deepspeed(accelerator):
        run.model.load_checkpoint(str(resume_from / "deepspeed"), tag="state", load_module_strict=False,
                                  load_optimizer_states=True, load_lr_scheduler_states=False)
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]
    set_seed(cfg.train.seed + accelerator.process_index)  # each process its own dropout stream
    run.metrics = MetricsWriter(cfg.train.output_dir, main, cfg.train.tensorboard, run.state.step)
    if main:
        (Path(cfg.train.output_dir) / fmt.CONFIG_FILE).write_text(dump_yaml(cfg))
    return run


# ------------------------------------------------------------------------------------------------- resume


def load_checkpoint_state(run: Run, path: Path) -> None:
    """Restore weights, optimizer, scheduler, data position and counters from checkpoint ``path`` (before
    ``accelerator.prepare``). The RNG states are restored later, when the loop starts (:func:`fit`)."""
    state = ckpt.TrainerState.load(path / fmt.TRAINER_STATE_FILE)
    _check_resumable(run, state, path)
    # Under ZeRO-3 the weights are partitioned since from_pretrained (zero3_init_flag): gather the trained ones
    # to full size, load them, and let the gather partition them back.
    with gathered(run.accelerator, _trained_params(run.raw), write=True):
        fmt.load_trained_weights(run.raw, path)
    if not is_deepspeed(run.accelerator) and not is_fsdp(run.accelerator):  # FSDP: after prepare (setup)
        load_optimizer_state(run.accelerator, run.model, run.optimizer, _optimizer_file(path), path)
    run.scheduler.load_state_dict(ckpt.load_torch_state(path / fmt.SCHEDULER_FILE))
    run.sampler.load_state_dict(state.sampler)
    run.bad.load_state_dict({"count": state.num_skipped})
    run.state = state
    if run.accelerator.is_main_process:
        print(f"resuming from {path} at step {state.step}", flush=True)


def _optimizer_file(path: Path) -> dict:
    """The checkpoint's optimizer state, memory-mapped: under FSDP every rank reads only its shard's pages."""
    return ckpt.load_torch_state(path / fmt.OPTIMIZER_FILE, mmap=True)


def _check_resumable(run: Run, state: ckpt.TrainerState, path: Path) -> None:
    """Exact resume needs the same micro-batches and the same global batch; anything else is refused, not
    approximated. On another process count (elastic resume) ``train.grad_accum`` is recomputed so that every
    step takes the same global micro-batches as before (accumulation x processes unchanged): the data order
    continues exactly, the numerics are not bitwise (other reductions, and fresh per-process RNG streams)."""
    t, n = run.cfg.train, run.accelerator.num_processes
    if state.micro_batch_size != t.micro_batch_size:
        raise ConfigError(f"train.resume: '{path}' was written with train.micro_batch_size="
                          f"{state.micro_batch_size}, this run has {t.micro_batch_size}; resume with the same value")
    if state.step > t.max_steps:
        raise ConfigError(f"train.resume: '{path}' is at step {state.step}, past train.max_steps={t.max_steps}")
    if state.world_size == n:
        if state.grad_accum != t.grad_accum:
            raise ConfigError(f"train.resume: '{path}' was written with train.grad_accum={state.grad_accum}, this "
                              f"run has {t.grad_accum}; resume with the same value")
        return
    per_step = state.grad_accum * state.world_size  # global micro-batches per optimizer step
    if per_step % n:
        raise ConfigError(f"train.resume: '{path}' takes {per_step} micro-batches per step ({state.world_size} "
                          f"processes x train.grad_accum={state.grad_accum}), which {n} processes cannot share "
                          f"evenly; resume on a process count that divides {per_step}")
    if is_deepspeed(run.accelerator):
        raise ConfigError(f"train.resume: '{path}' was written by {state.world_size} processes; DeepSpeed's "
                          f"partitioned optimizer state resumes on the same count only (this run has {n})")
    accum = per_step // n
    if t.grad_accum not in (state.grad_accum, accum):
        raise ConfigError(f"train.resume: resuming {state.world_size}-process '{path}' on {n} processes needs "
                          f"train.grad_accum={accum} (the same global batch); this run sets {t.grad_accum}")
    if run.accelerator.is_main_process:
        print(f"elastic resume: {state.world_size} -> {n} processes, train.grad_accum {state.grad_accum} -> "
              f"{accum} (global batch {per_step} micro-batches of {t.micro_batch_size}); the data order continues "
              "exactly, the numerics are not bitwise those of an uninterrupted run", flush=True)
    t.grad_accum = accum
    run.accelerator.gradient_accumulation_steps = accum  # its loss division and gradient sync follow this
    state.world_size, state.grad_accum = n, accum
    run.elastic = True


# ---------------------------------------------------------------------------------------------------- fit


def fit(run: Run) -> dict:
    """Train until ``train.max_steps``; save every ``train.save_steps`` and at the end. Returns a summary."""
    from tqdm.auto import tqdm

    cfg, acc, state = run.cfg, run.accelerator, run.state
    batches = iter(run.loader)
    if run.resumed_from is not None and not run.elastic:
        ckpt.load_rng(run.resumed_from, acc.process_index)  # after the loader started: the stream continues here
    elif run.elastic:  # the old per-process streams do not map onto the new processes: fresh ones, per step
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed + 1_000_003 * state.step + acc.process_index)
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not acc.is_main_process,
               desc="train", dynamic_ncols=True, file=sys.stdout)
    start, first_step, last_saved = time.perf_counter(), state.step, None
    try:
        while state.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            micro = [next_batch(run, batches) for _ in range(cfg.train.grad_accum)]
            result = train_step(run, micro)
            record = update_state(run, result, time.perf_counter() - t0)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if state.step % cfg.train.log_steps == 0 or state.step == cfg.train.max_steps:
                run.metrics.log(record)
            if _should_save(cfg, state.step):
                last_saved = save(run)
    finally:
        bar.close()  # also on an error, so that the error message starts on its own line
    return finish(run, last_saved, time.perf_counter() - start, state.step - first_step)


def _should_save(cfg: Config, step: int) -> bool:
    return step == cfg.train.max_steps or (cfg.train.save_steps > 0 and step % cfg.train.save_steps == 0)


def next_batch(run: Run, batches) -> dict:
    """The next micro-batch of this process. Every process takes exactly ``grad_accum`` per step, also when one
    holds only skipped samples (``batch_size`` 0; :func:`train_step` runs the dummy batch for it), so the data
    position stays the same on every process."""
    batch = next(batches)
    run.consumed += 1
    run.state.micro_batches += 1
    return batch


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    label_tokens: int
    samples: int
    skipped: int
    lrs: dict[str, float]  # learning rate of each parameter group used by this step


def train_step(run: Run, micro: list[dict]) -> StepResult:
    """One optimizer step over the micro-batches of this process (forward, backward, clip, step, schedule)."""
    from refvllm.model.refvlm import count_label_tokens

    acc, model = run.accelerator, run.model
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
    local = [sum(count_label_tokens(b["labels"]) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro),
             sum(b["batch_size"] for b in micro), sum(b["num_skipped"] for b in micro)]
    label_tokens, tokens, samples, skipped = all_reduce_sum(acc, local)
    if skipped:
        run.bad.add(gather_lists(acc, [s for b in micro for s in b["skipped"]]))  # DataError past the limit
    normalizer = max(1.0, label_tokens)
    # accelerate divides the loss by grad_accum and DDP averages gradients over processes: undo both, so the
    # gradient is exactly d(sum of token losses of the step) / d(theta) / normalizer.
    scale = acc.num_processes * run.cfg.train.grad_accum
    loss_sum = torch.zeros((), dtype=torch.float64)
    grad_norm = float("nan")
    for batch in micro:
        inputs = batch if batch["batch_size"] > 0 else run.dummy_batch
        with acc.accumulate(model):
            out = model(to_device(inputs, acc.device), loss_normalizer=normalizer, logits_at="labels",
                        pack=run.cfg.train.packing)
            acc.backward(out.loss * scale)
            loss_sum += out.loss.detach().double().cpu()
            if acc.sync_gradients:
                grad_norm = _clip(run)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    (loss,) = all_reduce_sum(acc, [float(loss_sum)])
    return StepResult(loss, grad_norm, int(tokens), int(label_tokens), int(samples), int(skipped), lrs)


def _clip(run: Run) -> float:
    """Clip the global gradient norm to ``train.max_grad_norm`` (<= 0: no clipping); returns the norm before.
    Under DeepSpeed the engine clips (gradient_clipping in its config) and the norm is read from it."""
    if is_deepspeed(run.accelerator):
        norm = run.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    max_norm = run.cfg.train.max_grad_norm if run.cfg.train.max_grad_norm > 0 else float("inf")
    norm = run.accelerator.clip_grad_norm_(run.trainable, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a replicated DTensor


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of the batch moved to ``device``; other values (ids, skip records) as they are."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def update_state(run: Run, result: StepResult, seconds: float) -> dict:
    """Advance the trainer state by one step; returns the metrics record of the step."""
    state = run.state
    state.step += 1
    state.samples += result.samples
    state.tokens += result.tokens
    state.label_tokens += result.label_tokens
    state.num_skipped = run.bad.count
    state.losses.append(result.loss)
    lrs = result.lrs
    record = {"step": state.step, "loss": result.loss, "lr": next(iter(lrs.values())),
              "tokens_per_s": result.tokens / max(seconds, 1e-9), "grad_norm": result.grad_norm,
              "num_skipped": state.num_skipped, "samples": state.samples, "tokens": state.tokens,
              "epoch": state.samples / len(run.loader.dataset), "step_time_s": seconds}
    record.update({f"lr/{name}": lr for name, lr in lrs.items() if not name.endswith(".no_decay")})
    return record


# --------------------------------------------------------------------------------------------------- save


def save(run: Run) -> Path:
    """Write ``checkpoint-STEP`` atomically (module docstring of refvllm.train.checkpoint); collective."""
    acc, cfg, step = run.accelerator, run.cfg, run.state.step
    tmp = ckpt.tmp_checkpoint_dir(cfg.train.output_dir, step)
    if acc.is_main_process:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    ckpt.save_rng(tmp, acc.process_index)
    save_weights(run, tmp)
    if is_deepspeed(acc):
        run.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True,
                                  save_latest=False)
    optimizer = optimizer_state(acc, run.model, run.optimizer)  # collective under FSDP
    if acc.is_main_process:
        _save_main_files(run, tmp, optimizer)
    acc.wait_for_everyone()
    final = fmt.checkpoint_dir(cfg.train.output_dir, step)
    if acc.is_main_process:
        ckpt.finalize_checkpoint(tmp, final)
        ckpt.rotate_checkpoints(cfg.train.output_dir, cfg.train.save_total_limit)
    acc.wait_for_everyone()
    _test_kill_hook(step)
    return final


def save_weights(run: Run, directory: Path) -> None:
    """The LoRA adapter and every other trainable weight (:func:`refvllm.checkpoint.save_trained_weights`).
    Collective under ZeRO-3 (weights are gathered); only the main process writes."""
    with gathered(run.accelerator, _trained_params(run.raw)) as full:
        if run.accelerator.is_main_process:
            fmt.save_trained_weights(run.raw, directory, full)


def _trained_params(raw) -> list:
    """What a checkpoint holds: every parameter that trains, and the extra trainables (gathered under ZeRO-3)."""
    return [p for p in raw.parameters() if p.requires_grad] + fmt.extra_trainable_params(raw)


def _save_main_files(run: Run, directory: Path, optimizer: dict | None) -> None:
    (directory / fmt.CONFIG_FILE).write_text(dump_yaml(run.cfg))
    if optimizer is not None:
        ckpt.save_torch_state(optimizer, directory / fmt.OPTIMIZER_FILE)
    ckpt.save_torch_state(run.scheduler.state_dict(), directory / fmt.SCHEDULER_FILE)
    run.state.sampler = run.sampler.state_dict(consumed=run.consumed)
    run.state.save(directory / fmt.TRAINER_STATE_FILE)


def _test_kill_hook(step: int) -> None:
    """Test hook (module docstring): die like a crash right after checkpoint ``step`` is complete."""
    if os.environ.get(KILL_AFTER_SAVE_ENV) == str(step):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- finish


def finish(run: Run, last_saved: Path | None, seconds: float, steps: int) -> dict:
    """Close the metrics, draw the loss curve, print and return a summary."""
    acc, out = run.accelerator, Path(run.cfg.train.output_dir)
    summary = {"output_dir": str(out), "step": run.state.step, "steps_this_run": steps,
               "seconds": round(seconds, 2), "final_loss": run.state.losses[-1] if run.state.losses else None,
               "num_skipped": run.state.num_skipped, "checkpoint": str(last_saved) if last_saved else None}
    run.metrics.close()
    if acc.is_main_process:
        curve = plot_loss_curve(out / "metrics.jsonl", out / LOSS_CURVE_FILE)
        summary["loss_curve"] = curve
        losses = run.state.losses
        if losses:
            print(f"loss {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)}); "
                  f"{steps} steps in {seconds:.1f}s", flush=True)
        if last_saved:
            print(f"saved {last_saved}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()
    return summary


def train(cfg: Config) -> dict:
    """Run training for ``cfg``; returns the summary of :func:`finish`."""
    run = setup(cfg)
    try:
        return fit(run)
    finally:
        if run.metrics is not None:
            run.metrics.close()


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(prog="refvllm train", description="Train a referring video-LLM.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: the demo config, configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str]) -> int:
    config, overrides = parse_args(argv)
    cfg = load_config(config, overrides)
    train(cfg)
    return 0

