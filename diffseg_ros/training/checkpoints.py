"""Resumable training runs shared by the trainers: run folder setup, stage checkpoints, learning-rate shape.

A stage folder holds weights.safetensors, optimizer.pt (our own file, read with weights_only=True),
state.json (step + metrics) and log.jsonl; files are replaced atomically, so a killed run resumes from
the last complete checkpoint.
"""
from dataclasses import asdict
import json
import math
import os
import time

import torch
from safetensors.torch import load_file, save_file


def start_run(cfg):
    """Set threads and seed, create the run folder and record the configuration in it."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, 'config.json'), 'w') as f:
        json.dump(asdict(cfg), f, indent=1)


def save_stage(path, model, opt, step, metrics, extra=None):
    """Write an atomic checkpoint of `model` (and `extra`) with the optimizer state (if any) and metrics."""
    os.makedirs(path, exist_ok=True)
    tensors = {f'model.{k}': v.contiguous() for k, v in model.state_dict().items()}
    if extra is not None:
        tensors.update({f'extra.{k}': v.contiguous() for k, v in extra.state_dict().items()})
    save_file(tensors, os.path.join(path, 'weights.tmp'))
    files = [('weights', 'safetensors'), ('state', 'json')]
    if opt is not None:
        torch.save(opt.state_dict(), os.path.join(path, 'optimizer.tmp'))
        files.append(('optimizer', 'pt'))
    with open(os.path.join(path, 'state.tmp'), 'w') as f:
        json.dump(dict(step=step, time=time.time(), **metrics), f)
    for name, ext in files:
        os.replace(os.path.join(path, f'{name}.tmp'), os.path.join(path, f'{name}.{ext}'))
    with open(os.path.join(path, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(dict(step=step, **metrics)) + '\n')


def load_stage(path, model, extra=None):
    """Load a stage's weights into `model` (and `extra`); return its step (0 when there is none)."""
    state = stage_state(path)
    if not state:
        return 0
    tensors = load_file(os.path.join(path, 'weights.safetensors'))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith('model.')})
    if extra is not None:
        extra.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith('extra.')})
    return state['step']


def load_optimizer(path, opt):
    """Restore the optimizer state of a stage, if it has one."""
    file = os.path.join(path, 'optimizer.pt')
    if os.path.isfile(file):
        opt.load_state_dict(torch.load(file, weights_only=True))


def stage_state(path):
    """Return a stage's state.json as a dict ({} before its first checkpoint)."""
    file = os.path.join(path, 'state.json')
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def checkpoint_every(path, model, opt, every, total, metrics, extra=None):
    """Make an `after_step` for core.train_loop.run_steps: save the stage every `every` steps and at the end.

    metrics(steps_done, loss, loss_ema) -> dict recorded with the checkpoint; called after every step
    (it may do periodic work of its own, such as a probe).
    """
    def after_step(done, loss, ema):
        values = metrics(done, loss, ema)
        if done % every == 0 or done == total:
            save_stage(path, model, opt, done, values, extra)
    return after_step


def lr_factor(step, total, warmup=500):
    """Linear warm-up then cosine decay to 10 %."""
    warmup = min(warmup, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
