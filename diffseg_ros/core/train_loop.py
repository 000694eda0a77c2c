"""The optimisation loop every trainer shares (Custom Diffusion concepts, the embedded SD, LDMSeg).

Each step: learning rate for the step, loss, backward, gradient clipping, optimizer step, a progress bar
showing the loss' moving average, then `after_step` (checkpoints, probes, progress reports). Trainers
supply only the loss of a step; resuming is starting at a later step.
"""
import torch
from tqdm import tqdm


def run_steps(loss_of_step, optimizer, start, total, desc, lr=None, clip=1.0, after_step=None,
              show_progress=True):
    """Run steps start..total-1; return the final loss moving average (None when nothing ran).

    loss_of_step(step) -> loss tensor, or (loss, {name: shown value}) to show more in the progress bar;
    lr(step) -> learning rate set on every parameter group before the step (None: left as it is);
    clip: max gradient norm (None: no clipping); after_step(steps_done, loss, loss_ema).
    """
    params = [p for group in optimizer.param_groups for p in group['params']]
    bar = tqdm(range(start, total), desc=desc, initial=start, total=total, disable=not show_progress)
    ema = None
    for step in bar:
        if lr is not None:
            for group in optimizer.param_groups:
                group['lr'] = lr(step)
        out = loss_of_step(step)
        loss, shown = out if isinstance(out, tuple) else (out, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.set_postfix(loss=f'{ema:.4f}', **shown)
        if after_step is not None:
            after_step(step + 1, value, ema)
    return ema
