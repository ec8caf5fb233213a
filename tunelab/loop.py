"""The training loop. It exists once: every method and task runs through `fit`.

Read top to bottom: optimizer and schedule → resume → for each epoch, for each global batch: accumulate
micro-batches, clip, step, log → evaluate / early-stop → checkpoint. Method differences come in through the
small `Method` interface (parameter groups, epoch hook, train mode) and nothing else.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tunelab import checkpoint, distributed, speed
from tunelab.checkpoint import TrainState
from tunelab.config import Config
from tunelab.data.batching import global_batches, split_global
from tunelab.distributed import Dist
from tunelab.errors import UserError
from tunelab.evaluate import evaluate
from tunelab.io import atomic_write_jsonl, read_jsonl_prefix
from tunelab.methods.base import Method
from tunelab.methods.features import FrozenFeatures, cache_features, model_inputs
from tunelab.tasks import Space, Task


def lr_lambda(schedule: str, warmup: int, total: int):
    """Linear warmup from 0, then linear or cosine decay to 0 (or constant)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)
    return f


@dataclass
class Loop:
    """Everything the loop needs, built once by the pipeline."""

    cfg: Config
    task: Task
    space: Space
    model: nn.Module
    method: Method
    train_items: list[dict]
    eval_items: list[dict]
    pad_id: int
    run: Path
    dist: Dist
    on_step: object = None  # callable(step) after each step; tests use it to simulate a crash
    on_eval: object = None  # callable(step, metrics) after each evaluation; hyperparameter search prunes here
    history: list[dict] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.task.primary if self.cfg.train.metric == "auto" else self.cfg.train.metric


def _autocast_dtype(loop: Loop):
    """The forward passes' autocast dtype: model.dtype's (resolved by the pipeline), or bfloat16 on a GPU with
    train.bf16; None for plain float32."""
    from tunelab.models import low_precision

    low = low_precision(loop.cfg.model.dtype)
    if low is not None:
        return low
    return torch.bfloat16 if loop.cfg.train.bf16 and loop.dist.device.type == "cuda" else None


def _step(loop: Loop, ddp: nn.Module, optimizer, batch: list[int], features: FrozenFeatures | None = None,
          tables: dict | None = None) -> tuple[float, dict]:
    """One optimizer step over one global batch: the batch's mean training loss and the task's extra log fields.
    `features` answers for the frozen backbone where the method replays its outputs; `tables` are the embedding
    tables `speed.reused_embedding_grads` yielded, for the clip."""
    t, d = loop.cfg.train, loop.dist
    micro = split_global(batch, d.rank, d.world, t.batch_size)
    weights = [1.0] * len(micro)
    if not micro:  # this process got no examples of a short last batch: contribute zero gradient
        micro, weights = [[batch[0]]], [0.0]
    if d.sharded:  # FSDP gathers and reduces on every micro-batch: each process runs as many as the first one,
        most = len(split_global(batch, 0, d.world, t.batch_size))  # which has the largest share
        micro, weights = micro + [[batch[0]]] * (most - len(micro)), weights + [0.0] * (most - len(micro))
    # Sum the loss and divide by the global batch's loss units (examples, or labelled tokens for ner), times the
    # world because DDP averages gradients: any split into processes and micro-batches gives the same gradient.
    units = sum(loop.task.units(loop.train_items[j]) for j in batch)
    scale = d.world / max(units, 1)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    cast = _autocast_dtype(loop)
    total = torch.zeros((), device=d.device)
    sums: dict[str, float] = {}
    for i, (idx, weight) in enumerate(zip(micro, weights)):
        inputs = {k: v.to(d.device) for k, v in loop.method.collate(loop.task, [loop.train_items[j] for j in idx],
                                                                    loop.pad_id).items()}
        with (_gradient_sync(ddp, d, i == len(micro) - 1),
              features.serving(loop.model, idx) if features else contextlib.nullcontext()):
            with torch.autocast(d.device.type, dtype=cast, enabled=cast is not None,
                                cache_enabled=False):  # (see pipeline.train: weights change every step)
                loss, extra = loop.method.forward(loop.task, ddp, inputs, loop.space)
            loss = loss * scale * weight
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + v * weight
            if t.l1 > 0:  # one L1 term per step, shared out over the micro-batches in proportion to their size
                l1 = sum(p.abs().sum() for p in params if p.ndim > 1)
                loss = loss + t.l1 * l1 * len(idx) * weight * d.world / len(batch)
            with torch.autocast(d.device.type, enabled=False):  # (a run in model.dtype is inside one)
                loss.backward()
        total += loss.detach()
    if t.max_grad_norm > 0 and d.sharded:  # torch's clip reads the norm of sharded gradients over every process
        nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    elif t.max_grad_norm > 0:
        speed.clip_grad_norm_(params, t.max_grad_norm, tables)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if d.world > 1:
        torch.distributed.all_reduce(total)
        total /= d.world
        if sums:
            reduced = torch.tensor(list(sums.values()), device=d.device, dtype=torch.float64)
            torch.distributed.all_reduce(reduced)
            sums = dict(zip(sums, reduced.tolist()))
    return float(total), loop.task.train_log(sums, units)


def _keep_global_batch(t, d: Dist, saved: int | None) -> None:
    """A run resumed on another number of processes keeps the examples per optimizer step it started with (the
    steps, the schedule and the data order depend on it): the accumulated micro-batches make up the difference."""
    if not saved or saved == t.batch_size * t.grad_accum * d.world:
        return
    if saved % d.world:
        raise UserError(f"this run takes {saved} examples per optimizer step, which {d.world} processes cannot "
                        f"share equally: resume it on a number of processes that divides {saved}", "--resume")
    per_process = saved // d.world
    t.batch_size = math.gcd(t.batch_size, per_process)
    t.grad_accum = per_process // t.batch_size
    if d.main:
        logging.getLogger(__name__).warning(
            "resuming on %d process(es): %d micro-batch(es) of %d per process keep the run's %d examples per step",
            d.world, t.grad_accum, t.batch_size, saved)


def _gradient_sync(ddp: nn.Module, d: Dist, last: bool):
    """Processes average their gradients on a step's last micro-batch only (one process: nothing to average)."""
    if d.sharded:
        ddp.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return ddp.no_sync() if d.world > 1 and not last else contextlib.nullcontext()


def _checkpoint(loop: Loop, optimizer, scheduler, state: TrainState) -> None:
    """A resumable checkpoint of this step: sharded for train.strategy fsdp (every process writes its part, on
    one process too, so that any number of processes resumes it), else the first process's plain one."""
    t = loop.cfg.train
    if t.strategy == "fsdp":
        checkpoint.save_sharded(loop.run, loop.model, optimizer, scheduler, state, t.keep_checkpoints)
    elif loop.dist.main:
        checkpoint.save(loop.run, loop.model, optimizer, scheduler, state, t.keep_checkpoints)
    loop.dist.barrier()


def _evaluate(loop: Loop, state: TrainState) -> dict:
    """Evaluate, record, and update early-stopping state (every process does it: same weights, same answer)."""
    t = loop.cfg.train
    m = evaluate(loop.task, loop.model, loop.eval_items, loop.space, loop.pad_id, loop.dist.device,
                 _autocast_dtype(loop))
    value = m[loop.metric]
    if loop.dist.world > 1:  # every process decides on the first one's number: the same best step, the same stop
        shared = torch.tensor([float(value)], dtype=torch.float64, device=loop.dist.device)
        torch.distributed.broadcast(shared, 0)
        value = shared.item()
    if loop.task.better(loop.metric, value, state.best):
        state.best, state.best_step, state.bad_evals = value, state.step, 0
        if t.early_stopping_patience > 0 and (loop.dist.main or loop.dist.sharded):
            checkpoint.save_best(loop.run, loop.model, sharded=loop.dist.sharded)
    else:
        state.bad_evals += 1
    if t.early_stopping_patience > 0 and state.bad_evals >= t.early_stopping_patience:
        state.stopped_early = True
    loop.dist.barrier()
    row = {"step": state.step, **{f"eval_{k}": v for k, v in m.items() if not k.startswith("_")}}
    if loop.on_eval:
        loop.on_eval(state.step, row)
    return row


def _log(loop: Loop, row: dict) -> None:
    loop.history.append(row)
    if loop.dist.main:
        with open(loop.run / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _record_solution(loop: Loop, state: TrainState, solved: dict, optimizer, scheduler) -> None:
    """Log a solver's objective after each of its evaluations as the steps of the run, evaluate the result once
    and checkpoint it as a finished run (a resume then has nothing left to do)."""
    trace = solved.pop("objective")
    for i, value in enumerate(trace, 1):
        _log(loop, {"step": i, "epoch": loop.cfg.train.epochs * i / len(trace), "loss": value, "lr": 1.0,
                    "samples_per_second": 0.0, "train_seconds": 0.0})
    solved["evaluations"] = len(trace)
    state.step, state.epoch, state.batch_in_epoch = len(trace), loop.cfg.train.epochs, 0
    _log(loop, _evaluate(loop, state))
    _checkpoint(loop, optimizer, scheduler, state)


def fit(loop: Loop, resume: bool = False) -> dict:
    """Train in place; returns timing and state figures for metrics.json. A sharded run (train.strategy fsdp)
    ends with `loop.model` a new plain model holding the trained weights whole."""
    cfg, t, d, model = loop.cfg, loop.cfg.train, loop.dist, loop.model
    last = checkpoint.latest(loop.run) if resume else None
    warmed = skeleton = None
    if d.sharded:  # sharded before the optimizer holds its parameters; the warm start reads the plain model
        warmed = loop.method.before_training(loop) if last is None else None
        skeleton = distributed.shard(model, d)
    groups = loop.method.param_groups(model, t, cfg.tuning)
    # The fused AdamW (one kernel over all tensors) is the same update as the default one: the default's per-tensor
    # loop took 24% of a MiniLM full-tuning step on 2 CPU cores (bench/NOTES.md), fused 4%.
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=t.lr,
                                  fused=d.device.type in ("cpu", "cuda"))
    if last is not None:
        _keep_global_batch(t, d, checkpoint.read_state(last).global_batch)
    global_batch = t.batch_size * t.grad_accum * d.world
    lengths = [loop.task.length(it) for it in loop.train_items]
    steps_per_epoch = math.ceil(len(lengths) / global_batch)
    total_steps = steps_per_epoch * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.schedule, int(t.warmup_ratio * total_steps), total_steps))

    # The speed-ups' probe batch is made before a checkpoint restores the random state: collating augmented pictures
    # draws from it, and a resumed run must draw the views the uninterrupted one drew. Two items: the checks run
    # it forward and backward with and without a speed-up and hold both (8 items of 256 tokens made that check,
    # not training, SmolLM2 LoRA's peak: 7.2 GB against 4.9 without it).
    probe = model_inputs(loop.task, loop.train_items[:2], loop.pad_id, d.device)
    state = TrainState(global_batch=global_batch)
    if last is not None:
        state = checkpoint.load(last, model, optimizer, scheduler)
        state.global_batch = global_batch
        loop.history = [h for h in read_jsonl_prefix(loop.run / "history.jsonl") if h["step"] <= state.step]
        if d.main:
            atomic_write_jsonl(loop.run / "history.jsonl", loop.history)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) \
        if d.world > 1 and not d.sharded else model

    bar = tqdm(total=total_steps, initial=state.step, disable=not (t.progress and d.main), unit="step",
               dynamic_ncols=True, mininterval=2.0)
    started, seen, tokens, step_seconds = time.perf_counter(), 0, 0, 0.0
    # text classifier-style tasks (language-model stages have other models; image networks no token positions)
    sequence = not loop.task.judged_by_start and loop.task.modality == "text"
    with speed.apply(model, probe, on=t.speedups and not d.sharded, dropout=t.fast_dropout, sequence=sequence,
                     causal_lm=loop.task.loss_from_hidden and t.chunked_loss, single_process=d.world == 1,
                     sole_writer=t.l1 == 0, checked=state.checked) as fast:
        tables = fast["tables"]
        state.checked = {k: fast[k] for k in speed.CHECKED}
        features = None
        if loop.method.replays_features and cfg.tuning.cache_features and sequence and \
                loop.task.replayable(loop.train_items):
            features = cache_features(loop.task, model, loop.train_items, loop.pad_id, d.device)
            step_seconds = time.perf_counter() - started  # the cache is part of the training's time
        if not d.sharded:
            warmed = loop.method.before_training(loop) if state.step == 0 else None  # a resume keeps its weights
        solved = loop.method.solve(loop, features) if state.epoch < t.epochs else None
        if solved is not None:  # fitted in one call (head): its iterations are the log, then one evaluation
            _record_solution(loop, state, solved, optimizer, scheduler)
            step_seconds = time.perf_counter() - started
            seen = len(lengths)
        for epoch in range(state.epoch, t.epochs):
            loop.method.on_epoch_start(model, epoch, cfg.tuning)
            batches = global_batches(lengths, global_batch, t.seed, epoch)
            for b in range(state.batch_in_epoch, len(batches)):
                loop.method.train_mode(model)
                tic = time.perf_counter()
                loss, extra = _step(loop, ddp, optimizer, batches[b], features, tables)
                scheduler.step()
                dt = time.perf_counter() - tic
                step_seconds, seen = step_seconds + dt, seen + len(batches[b])
                tokens += sum(lengths[j] for j in batches[b])
                end_of_epoch = b == len(batches) - 1
                state.step += 1
                state.epoch, state.batch_in_epoch = (epoch + 1, 0) if end_of_epoch else (epoch, b + 1)
                _log(loop, {"step": state.step, "epoch": epoch + (b + 1) / len(batches), "loss": loss,
                            **extra, "lr": scheduler.get_last_lr()[-1], "samples_per_second": len(batches[b]) / dt,
                            "train_seconds": step_seconds})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{len(batches[b]) / dt:.1f}")
                if (t.eval_every and state.step % t.eval_every == 0) or (not t.eval_every and end_of_epoch):
                    _log(loop, _evaluate(loop, state))
                if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or end_of_epoch or state.stopped_early:
                    _checkpoint(loop, optimizer, scheduler, state)
                if loop.on_step:
                    loop.on_step(state.step)
                if state.stopped_early:
                    break
            if state.stopped_early:
                break
    bar.close()
    if d.sharded:
        optimizer.state.clear()  # (the moments are saved in the last checkpoint: room for the gathered weights)
        model = loop.model = distributed.gather(model, skeleton, d)
    if t.early_stopping_patience > 0:
        checkpoint.load_best(loop.run, model)  # the best weights (by t.metric) replace the last ones
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "step_seconds": step_seconds, "samples_seen": seen, "tokens_seen": tokens,
            "steps": state.step, "cached_features": features.kept if features else None,
            **{k: bool(v) and (k in ("first_token_only", "chunked_loss") or d.device.type == "cpu")  # what ran
               for k, v in fast.items() if k != "tables"},
            "samples_per_second": seen / step_seconds if step_seconds else 0.0,
            "stopped_early": state.stopped_early, "best_step": state.best_step, "best": state.best,
            **({"solver": solved} if solved is not None else {}), **({"warm_start": warmed} if warmed else {})}
