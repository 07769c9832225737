"""Stage two: train a student from a teacher cache (``setup -> fit``); no teacher loaded.

Read in this order: the run, built before the first step (``student.setup``: ``setup``, ``Run``; where it
starts, fresh / ``--init-from`` / ``--resume``, is ``student.sources.resolve_start``); one optimizer step
(``student.step``: ``accumulate``, ``optimizer_step``, the step's sums ``StepSums``, the loss formula of
``student.losses.combine_loss``); then here: periodic evaluation (``evaluate``), checkpoint calls, the
loop (``fit``, with what it logs in ``TrainLog``) and the entry point (``train_student``). The run config is
``student.train_config``, the caches and the split ``student.train_data``.

An output folder holds ``checkpoint-last/``, ``final/`` (``student.checkpoint``), ``metrics.jsonl`` and
``curves.png`` (``student.metrics``). ``resume`` continues from ``checkpoint-last/`` exactly: the data
position comes from the deterministic sampler, the learning rate from ``lr_at(step)``.
"""

from __future__ import annotations

import datetime
import gc
import math
import shlex
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from cache.device import Dist
from cache.interrupt import Interrupted, StopSignals, command_line, signal_name
from cache.progress import Progress, format_duration
from cache.util import UserError
from student.any_student import CausalLMStudent
from student.any_student import describe as describe_causal_lm
from student.checkpoint import (
    BEST,
    CHECKPOINT,
    FINAL,
    TRAINER_STATE,
    folder_problem,
    provenance,
    rng_state,
    write_folder_atomically,
    write_model_folder,
    write_trainer_state,
)
from student.chunked_loss import chunked_distill_loss
from student.data import TokenBudgetBatchSampler, gather_rows
from student.losses import combine_loss
from student.metrics import METRICS, MetricsLog
from student.modeling import count_parameters
from student.reporting import open_reporters
from student.schedule import lr_at
from student.setup import Run, make_loader, micro_batches_per_step, setup
from student.step import StepSums, TrainHooks, accumulate, optimizer_step, targets_for
from student.train_config import TrainConfig, recorded_config

# ``fit`` calls ``accumulate`` and ``optimizer_step`` through this module: a test may replace them here.
__all__ = ["CHECKPOINT", "FINAL", "METRICS", "TRAINER_STATE", "StepSums", "TrainConfig", "TrainHooks",
           "TrainResult", "TrainingDiverged", "accumulate", "evaluate", "fit", "micro_batches_per_step",
           "optimizer_step", "setup", "targets_for", "train_student"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing was updated with it and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: Path
    final_metrics: dict[str, Any]
    wall_s: float


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """CE on the labels, KL(teacher || student) at T = 1 over top-k + tail, and top-1 agreement with the
    teacher, per supervised token of the validation set (split across ranks, then summed)."""
    data = run.data
    if data.val is None:
        return {}
    sampler = TokenBudgetBatchSampler.from_dataset(data.val, run.cfg.batch_tokens, seed=0,
                                                   micro_batches_per_step=run.dist.world_size,
                                                   world_size=run.dist.world_size, rank=run.dist.rank)
    loader = make_loader(data.val, sampler, data.pad_id, 0, run.device)
    with_kl = data.val_t1_index is not None
    sums = torch.zeros(5, dtype=torch.float64, device=run.device)
    was_training = run.model.training
    run.model.eval()
    try:
        for batch in loader:
            batch = batch.to(run.device)
            targets = targets_for(run, batch, data.val_t1_index or 0)
            with run.autocast():
                hidden = run.model.hidden_states(batch.input_ids, batch.attention_mask)  # (B, Lmax, d)
                s = chunked_distill_loss(gather_rows(hidden, batch.pred_pos),
                                         run.model.get_output_embeddings().weight, targets, kind="topk_tail",
                                         temperature=1.0, chunk_size=run.cfg.chunk_size, with_kd=with_kl,
                                         pred_shift=getattr(run.model, "argmax_shift", None))
            rows = torch.tensor(float(s.num_rows), dtype=torch.float64, device=run.device)
            sums += torch.stack([s.ce.double(), s.kd.double(), s.top1_agree.double(),
                                 s.label_correct.double(), rows])
    finally:
        run.model.train(was_training)
    ce, kl, agree, correct, rows = run.dist.all_reduce(sums).tolist()
    rows = max(rows, 1.0)
    out = {"val_ce": ce / rows, "val_top1_agree": agree / rows, "val_label_acc": correct / rows,
           "val_tokens": int(rows)}
    if with_kl:
        out["val_kl"] = kl / rows
    return out


# ------------------------------------------------------------------------------------------- checkpoints


def _save_model_folder(run: Run, folder: Path) -> None:
    prov = provenance(run.cfg, run.data, asdict(run.state), world_size=run.dist.world_size,
                      precision=run.precision, micro_batches_per_step=run.micro_per_step)
    write_model_folder(folder, run.model, run.data.reader.tokenizer_dir, run.cfg, prov)


def save_checkpoint(run: Run) -> None:
    """``checkpoint-last/``: model folder + optimizer, scaler, every rank's RNG and the data position."""
    rng = rng_state()
    if run.dist.distributed:
        states: list[Any] = [None] * run.dist.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if run.is_main:
        trainer = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": states,
                   "state": asdict(run.state), "seed": run.cfg.seed}

        def write(folder: Path) -> None:
            _save_model_folder(run, folder)
            write_trainer_state(folder, trainer)

        write_folder_atomically(run.cfg.out, CHECKPOINT, write, run.state.step)
    run.last_checkpoint_step = run.state.step
    run.dist.barrier()


def save_best(run: Run) -> None:
    """``best/``: the model at the evaluation with the lowest validation CE so far (``--keep-best``)."""
    if run.is_main:
        write_folder_atomically(run.cfg.out, BEST, lambda folder: _save_model_folder(run, folder),
                                run.state.step)
    run.dist.barrier()


def save_final(run: Run) -> Path:
    """``final/``: the model alone, for ``CausalFNetForCausalLM.from_pretrained``, with its tokenizer."""
    if run.is_main:
        write_folder_atomically(run.cfg.out, FINAL, lambda folder: _save_model_folder(run, folder),
                                run.state.step)
    run.dist.barrier()
    return run.cfg.out / FINAL

# --------------------------------------------------------------------------------------------------- fit


def fit(run: Run, hooks: TrainHooks | None = None, stop: StopSignals | None = None) -> TrainResult:
    """Train to ``cfg.steps`` optimizer steps, evaluating, logging and checkpointing on the way. A resumed
    run that had already finished only rewrites ``final/`` when it is missing or damaged. When ``stop`` has
    recorded SIGINT/SIGTERM (on any rank), the step in progress ends (with its evaluation and checkpoint when
    due), ``checkpoint-last/`` is written at that step and ``Interrupted`` is raised."""
    t_start = time.perf_counter()
    cfg, st = run.cfg, run.state
    keep_until = st.step if cfg.resume else None
    # --report-to: rank 0 opens the trackers (a finished run resumed has nothing to report)
    reporters = (open_reporters(cfg.report_to, cfg.out, keep_until, recorded_config(cfg),
                                wandb_project=cfg.wandb_project, run_name=cfg.run_name)
                 if run.is_main and st.step < cfg.steps else [])
    metrics = MetricsLog(cfg.out, run.is_main, keep_until, reporters)
    if st.step >= cfg.steps:
        return _already_finished(run, metrics, t_start)
    if run.is_main:
        _describe(run)
    log = TrainLog(run, metrics, t_start)
    if st.step == 0 and cfg.eval_every:
        run_eval(run, log)
    log.open_bar()
    try:
        while st.step < cfg.steps:
            train_epoch(run, log, hooks, stop)
    except BaseException:
        metrics.close()  # the TensorBoard writer's thread ends with its events flushed
        raise
    finally:
        log.bar.close()
    try:
        run_eval(run, log)
        save_checkpoint(run)
        save_final(run)
        metrics.plot(force=True)
    finally:
        metrics.close()
    return log.result()


def train_epoch(run: Run, log: TrainLog, hooks: TrainHooks | None, stop: StopSignals | None) -> None:
    """The optimizer steps of the current epoch from the sampler's position, each followed by its logging,
    evaluation, checkpoint and stop check; ends early at ``cfg.steps``."""
    cfg, st = run.cfg, run.state
    run.sampler.set_epoch(st.epoch, st.batches_consumed)
    batches = iter(run.loader)
    for plan in run.sampler.steps():
        micro = []
        for _ in plan.micro_batches:
            batch = next(batches).to(run.device)
            if hooks is not None and hooks.micro_batch is not None:
                hooks.micro_batch(st.step, batch)
            micro.append(batch)
        sums = accumulate(run, micro, plan.num_supervised, hooks)
        _check_finite(run, sums)
        lr = lr_at(st.step, cfg.schedule_config())
        grad_norm = optimizer_step(run)
        st.step += 1
        st.batches_consumed = plan.index + 1
        st.tokens += int(sums.tokens)
        st.supervised_tokens += int(sums.rows)
        log.step(sums, lr, grad_norm)
        if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.steps:
            run_eval(run, log)
        if cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.steps:
            save_checkpoint(run)
        if hooks is not None and hooks.after_step is not None:
            hooks.after_step(st.step)
        if stop is not None and st.step < cfg.steps and (signum := stop.agreed(run.device)):
            if run.last_checkpoint_step != st.step:
                save_checkpoint(run)
            raise Interrupted(signum, _stopped_line(run.cfg, signum, run))
        if st.step >= cfg.steps:
            return
    del batches
    st.epoch += 1
    st.batches_consumed = 0


def _check_finite(run: Run, sums: StepSums) -> None:
    """Before the update: a NaN or infinite loss stops the run (``TrainingDiverged``)."""
    lc = run.cfg.loss_config()
    loss = combine_loss(sums, alpha=lc.alpha, temperature=lc.temperature, normalizer=max(sums.rows, 1.0))
    if not (math.isfinite(loss) and math.isfinite(sums.loss)):
        loss = loss if not math.isfinite(loss) else sums.loss
        raise TrainingDiverged(_diverged_message(run, loss))


def run_eval(run: Run, log: TrainLog) -> None:
    """Evaluate, log it (a line on the terminal too), and with ``--keep-best`` save ``best/`` at a new lowest
    validation CE."""
    st = run.state
    if run.data.val is None:
        return
    log.eval({"event": "eval", "step": st.step, "tokens": st.tokens, **evaluate(run)})
    if run.cfg.keep_best and (st.best_val_ce is None or log.last_eval["val_ce"] < st.best_val_ce):
        st.best_val_ce, st.best_step = log.last_eval["val_ce"], st.step
        save_best(run)


class TrainLog:
    """What ``fit`` reports: a ``train`` line in ``metrics.jsonl`` every ``--log-every`` steps (the means
    over the steps since the last one), the ``eval`` lines, the progress bar and the final metrics."""

    def __init__(self, run: Run, metrics: MetricsLog, t_start: float):
        self.run, self.metrics, self.t_start = run, metrics, t_start
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.bar: Progress | None = None
        self.window, self.window_t, self.window_steps = StepSums(), time.perf_counter(), 0

    def open_bar(self) -> None:
        """A bar on a terminal; in a log file one plain line every --log-every steps (or 30 s) with loss and
        ETA. Its loss is the mean over the steps since the last metrics line, up to this step: at a
        --log-every step exactly the loss that metrics.jsonl records, in between never a stale value."""
        cfg = self.run.cfg
        self.bar = Progress(cfg.steps, desc="train", unit="step", initial=self.run.state.step,
                            enabled=cfg.progress and self.run.is_main, every=cfg.log_every)
        self.window, self.window_t, self.window_steps = StepSums(), time.perf_counter(), 0

    def _loss(self, sums: StepSums) -> float:
        lc = self.run.cfg.loss_config()
        return combine_loss(sums, alpha=lc.alpha, temperature=lc.temperature, normalizer=max(sums.rows, 1.0))

    def step(self, sums: StepSums, lr: float, grad_norm: float) -> None:
        cfg, st = self.run.cfg, self.run.state
        self.window = self.window + sums
        self.window_steps += 1
        w = self.window
        shown = {"loss": self._loss(w)}
        if st.step % cfg.log_every == 0 or st.step == cfg.steps:
            dt = max(time.perf_counter() - self.window_t, 1e-9)
            rows = max(w.rows, 1.0)
            self.last_train = {
                "event": "train", "step": st.step, "epoch": st.epoch, "tokens": st.tokens,
                "supervised_tokens": st.supervised_tokens, "lr": lr, "loss": self._loss(w),
                "ce": float(w.ce / rows), "kd": float(w.kd / rows) if cfg.alpha < 1 else None,
                "top1_agree": float(w.top1_agree / rows), "grad_norm": grad_norm,
                "tokens_per_s": float(w.tokens / dt), "steps_per_s": self.window_steps / dt,
                "elapsed_s": time.perf_counter() - self.t_start,
            }
            self.metrics.write(self.last_train)
            self.window, self.window_t, self.window_steps = StepSums(), time.perf_counter(), 0
        self.bar.update(1, tokens=int(sums.tokens), **shown)

    def eval(self, line: dict[str, Any]) -> None:
        cfg = self.run.cfg
        self.last_eval = line
        self.metrics.write(line)
        if cfg.progress and self.run.is_main:  # in a log file too (there the bar is a line every --log-every)
            kl = line.get("val_kl")
            text = (f"eval step {line['step']}: val CE {line['val_ce']:.4f}"
                    + ("" if kl is None else f", KL to the teacher {kl:.4f}")
                    + f", top-1 agreement {line['val_top1_agree']:.1%}"
                    + f", elapsed {format_duration(time.perf_counter() - self.t_start)}")
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, file=sys.stderr, flush=True)
        self.metrics.plot()

    def result(self) -> TrainResult:
        st = self.run.state
        wall = time.perf_counter() - self.t_start
        final = {k: v for k, v in {**self.last_train, **self.last_eval}.items() if k != "event"}
        final.update(step=st.step, tokens=st.tokens, supervised_tokens=st.supervised_tokens, wall_s=wall)
        return TrainResult(out_dir=self.run.cfg.out, final_metrics=final, wall_s=wall)


def _already_finished(run: Run, metrics: MetricsLog, t_start: float) -> TrainResult:
    """``--resume`` of a run whose last checkpoint is its final step: its final evaluation is already in
    ``metrics.jsonl``; only a missing or damaged ``final/`` is written again."""
    st = run.state
    if run.is_main:
        print(f"train-student: the run in {run.cfg.out} already reached step {st.step}; nothing to train",
              file=sys.stderr)
    if run.is_main and folder_problem(run.cfg.out / FINAL) is not None:
        write_folder_atomically(run.cfg.out, FINAL, lambda folder: _save_model_folder(run, folder), st.step)
    run.dist.barrier()
    last = {k: v for k, v in {**metrics.last("train"), **metrics.last("eval")}.items() if k != "event"}
    metrics.close()
    wall = time.perf_counter() - t_start
    last.update(step=st.step, tokens=st.tokens, supervised_tokens=st.supervised_tokens, wall_s=wall)
    return TrainResult(out_dir=run.cfg.out, final_metrics=last, wall_s=wall)


def _diverged_message(run: Run, loss: float) -> str:
    where = (f"the last good checkpoint is {run.cfg.out / CHECKPOINT} (step {run.last_checkpoint_step})"
             if run.last_checkpoint_step is not None else "no checkpoint had been saved yet")
    return (f"loss is {loss} at step {run.state.step + 1}; stopped before updating the weights, {where}; "
            "lower --lr (or raise --warmup, use --clip) and resume or restart")


def _describe(run: Run) -> None:
    mc = run.model.config
    if isinstance(run.model, CausalLMStudent):
        shape = describe_causal_lm(run.model)
    else:
        vocab = (f"{mc.vocab_size} (compacted from {mc.full_vocab_size})" if mc.vocab_map
                 else str(mc.vocab_size))
        shape = (f"d={mc.hidden_size}, {mc.num_hidden_layers} layers, FFN {mc.intermediate_size}, "
                 f"W={mc.stft_window_size}, vocab {vocab}")
    print(f"train-student: {count_parameters(run.model):,} parameters ({shape}); "
          f"{len(run.data.train)} train sequences"
          + ("" if not run.data.mix else " per epoch (" + ", ".join(
              f"{n:,} from {c}" for c, n in zip(run.data.mix["caches"], run.data.mix["counts"])) + ")")
          + ", "
          f"{'no' if run.data.val is None else len(run.data.val)} validation sequences; "
          f"{run.micro_per_step} micro-batches of <= {run.cfg.batch_tokens} tokens per step "
          f"({run.dist.world_size} rank(s)); {run.device} {run.precision}"
          + (f"; resuming at step {run.state.step}" if run.cfg.resume else ""), file=sys.stderr)


# ------------------------------------------------------------------------------------------- interruption


def resume_command(cfg: TrainConfig, resume: bool = True) -> str:
    """The command that continues this run: the process's own ``fnet-distill train-student`` (or torchrun)
    line with ``--resume`` added; for a library call, an equivalent ``fnet-distill train-student`` line."""
    line = command_line("train-student", ["--resume"] if resume else [])
    if line is not None:
        return line
    args = ["fnet-distill", "train-student"]
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in ("resume", "schedule_steps") or (f.default is not MISSING and v == f.default):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("cache", "mix_caches"):
            args += [a for p in (v if f.name == "mix_caches" else [v]) for a in ("--cache", str(p))]
        elif f.name == "cache_weights":
            args += [flag, ",".join(f"{w:g}" for w in v)]
        elif isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [flag, str(v)]
    args += ["--resume"] if resume else []
    return shlex.join(args)


def _stopped_line(cfg: TrainConfig, signum: int, run: Run | None) -> str:
    """The one line printed when SIGINT/SIGTERM stopped the run: where it stopped and how to go on."""
    head = f"train-student: stopped by {signal_name(signum)}"
    if run is not None:
        step = run.state.step
        return (f"{head} after step {step} of {run.cfg.steps}; saved {cfg.out / CHECKPOINT} (step {step}); "
                f"resume with: {resume_command(cfg)}")
    if (cfg.out / CHECKPOINT / TRAINER_STATE).is_file():
        return (f"{head} before its first step; {cfg.out / CHECKPOINT} is unchanged; resume with: "
                f"{resume_command(cfg)}")
    return f"{head} before its first step; nothing was saved; start again with: {resume_command(cfg, False)}"


def _second_line(cfg: TrainConfig, run: Run | None, signum: int) -> str:
    head = f"train-student: second {signal_name(signum)}, stopped at once without saving"
    step = run.last_checkpoint_step if run is not None else None
    if step is None and not (cfg.out / CHECKPOINT / TRAINER_STATE).is_file():
        return f"{head}; no checkpoint yet, start again with: {resume_command(cfg, False)}"
    where = f"{cfg.out / CHECKPOINT}" + (f" (step {step})" if step is not None else "")
    return f"{head}; the last checkpoint, {where}, is kept; resume with: {resume_command(cfg)}"


def train_student(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a student from ``cfg.cache`` into ``cfg.out`` (under ``torchrun`` too); see ``TrainConfig``."""
    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar, between our own progress lines
    dist = Dist.from_env()
    own_group = False
    if dist.distributed and not torch.distributed.is_initialized():
        nccl = torch.cuda.is_available() and cfg.device != "cpu"
        if nccl:
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(hours=2))
        own_group = True
    run = None
    # SIGINT/SIGTERM: during setup the run stops at once (nothing of it to save yet); from the first step on,
    # at the end of the step in progress with a checkpoint; a second signal exits at once.
    stop = StopSignals(lambda signum: _second_line(cfg, run, signum) if dist.rank == 0 else "",
                       distributed=dist.distributed)
    try:
        with stop:
            run = setup(cfg, dist)
            if hooks is not None and hooks.ready is not None:
                hooks.ready()
            stop.defer()
            return fit(run, hooks, stop)
    except Interrupted as e:
        if e.detailed:
            raise
        raise Interrupted(e.signum, _stopped_line(cfg, e.signum, None)) from None
    except torch.cuda.OutOfMemoryError:
        step = run.state.step + 1 if run is not None else 0
        raise UserError(f"CUDA out of memory at step {step}; lower --batch-tokens, use --compact-vocab or "
                        "--grad-checkpointing") from None
    finally:
        if run is not None:
            run.close()
        # The DDP wrapper goes before the process group: its reducer holds a reference to the group and, as
        # the last holder, destroys it with the GIL held while gloo's thread may need the GIL to free a
        # finished barrier's tensors (a deadlock at exit). Dropped first, the group is freed by
        # destroy_process_group, which releases the GIL.
        run = None
        if dist.distributed:
            gc.collect()
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
