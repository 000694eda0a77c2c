"""LDMSeg's denoiser: a diffusers UNet2DModel (no text, no cross-attention) on 12 input channels.

Input = [noisy mask latent (4), image latent (4), self-conditioning x0-estimate (4)]; the weights of the
last 8 input channels start at zero so a UNet copied from Stable Diffusion starts out as SD's denoiser.
Training: epsilon prediction, SD's noise schedule, loss weight min(SNR, 2) / SNR, and self-conditioning:
for a random half of the batch a first pass without gradients estimates x0, which is fed to the second.
Sampling: DDIM, eta = 0, "trailing" timesteps (999, 979, ..., 19 for 50 steps); x0-estimate fed back at
every step. Known latents (inpainting, paper algorithm 3) overwrite the x0-estimate at known cells before
the step re-noises it, so they enter every step at the right noise level and the last step keeps them exactly
(`set_alpha_to_one`: the final step lands on the clean x0-estimate).
"""
import math

import torch
from diffusers import DDIMScheduler, UNet2DModel

LATENT_CHANNELS = 4
# SD 1.x noise schedule with DDIM trailing spacing (999, 979, ..., 19 for 50 steps), as LDMSeg samples.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                clip_sample=False, set_alpha_to_one=True, steps_offset=1, prediction_type='epsilon',
                timestep_spacing='trailing')


def make_scheduler():
    return DDIMScheduler(**SCHEDULE)


# --- the UNet -----------------------------------------------------------------------------------------------
def unet_config(block_out_channels=(32, 64, 128), layers_per_block=1, attention=(False, True, True),
                norm_num_groups=16, head_dim=32, sample_size=32, latent_channels=LATENT_CHANNELS):
    """UNet2DModel kwargs: self-attention blocks at the levels flagged in `attention` (and in the middle)."""
    widths = [c for c, a in zip(block_out_channels, attention) if a] + [block_out_channels[-1]]
    head_dim = math.gcd(head_dim, *widths)
    return dict(sample_size=sample_size, in_channels=3 * latent_channels, out_channels=latent_channels,
                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attention),
                up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attention)),
                norm_num_groups=norm_num_groups, attention_head_dim=head_dim)


def unet_config_from_sd(sd_config, sample_size=None):
    """Config of an LDMSeg UNet shaped like an SD UNet: same widths and depth, self-attention as SD."""
    levels = len(sd_config['block_out_channels'])
    only_cross = sd_config.get('only_cross_attention', False)
    only_cross = [only_cross] * levels if isinstance(only_cross, bool) else list(only_cross)
    kinds = sd_config['down_block_types']
    attention = tuple('CrossAttn' in kind and not cross for kind, cross in zip(kinds, only_cross))
    return unet_config(tuple(sd_config['block_out_channels']), sd_config['layers_per_block'], attention,
                       sd_config['norm_num_groups'], sample_size=sample_size or sd_config['sample_size'])


def build_unet(config):
    """Build a UNet2DModel whose image and self-conditioning input channels start at zero."""
    unet = UNet2DModel(**config)
    with torch.no_grad():
        unet.conv_in.weight[:, LATENT_CHANNELS:] = 0
    return unet


def init_from_sd(unet, sd_unet):
    """Initialise from an SD UNet; return the names of the tensors copied.

    Every SD tensor with the same name and shape is copied (resnets, time embedding, norms, conv_out), and
    SD's conv_in goes into the noisy-latent input channels. Cross-attention has no counterpart and is dropped.
    """
    ours, theirs = unet.state_dict(), sd_unet.state_dict()
    copied = [k for k, v in theirs.items() if k in ours and ours[k].shape == v.shape]
    with torch.no_grad():
        for name in copied:
            ours[name].copy_(theirs[name])
        ours['conv_in.weight'].zero_()
        ours['conv_in.weight'][:, :LATENT_CHANNELS] = theirs['conv_in.weight']
    return copied + ['conv_in.weight']


# --- training -----------------------------------------------------------------------------------------------
def _per_sample(values, t, like):
    return values.to(like.device, like.dtype)[t].view(-1, *([1] * (like.ndim - 1)))


def snr(scheduler, t):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps t."""
    alpha_bar = scheduler.alphas_cumprod[t]
    return alpha_bar / (1 - alpha_bar)


def loss_weights(scheduler, t, gamma=2.0):
    """Min-SNR weighting for epsilon prediction: min(SNR, gamma) / SNR (1 at high noise, small near t = 0)."""
    ratio = snr(scheduler, t)
    return ratio.clamp(max=gamma) / ratio


def predict_x0(scheduler, noisy, eps, t):
    """Invert the forward process (paper eq. 3) for the clean latent."""
    alpha_bar = _per_sample(scheduler.alphas_cumprod, t, noisy)
    return (noisy - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def predict_noise(unet, noisy, image_latents, self_cond, t):
    return unet(torch.cat([noisy, image_latents, self_cond], dim=1), t).sample


def training_loss(unet, scheduler, mask_latents, image_latents, self_cond_prob=0.5, gamma=2.0,
                  generator=None):
    """Weighted epsilon loss of one batch with self-conditioning on a random `self_cond_prob` share of it."""
    batch, device = mask_latents.shape[0], mask_latents.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
    noise = torch.randn(mask_latents.shape, generator=generator).to(device, mask_latents.dtype)
    noisy = scheduler.add_noise(mask_latents, noise, t)
    self_cond = torch.zeros_like(mask_latents)
    chosen = (torch.rand(batch, generator=generator) < self_cond_prob).to(device)
    if chosen.any():
        with torch.no_grad():
            eps = predict_noise(unet, noisy[chosen], image_latents[chosen], self_cond[chosen], t[chosen])
            self_cond[chosen] = predict_x0(scheduler, noisy[chosen], eps, t[chosen])
    eps = predict_noise(unet, noisy, image_latents, self_cond, t)
    per_sample = (eps.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * loss_weights(scheduler, t.cpu(), gamma).to(device)).mean()


# --- sampling -----------------------------------------------------------------------------------------------
def inference_timesteps(scheduler, steps):
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def previous_alpha_bar(scheduler, t, steps):
    """alpha_bar of the timestep a DDIM step from t lands on (1 after the last step)."""
    prev = t - scheduler.config.num_train_timesteps // steps
    return scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod


@torch.no_grad()
def ddim_sample(unet, scheduler, image_latents, steps, generator=None, known_cells=None, known_latents=None,
                callback=None, resample=1):
    """Sample mask latents for image latents (B, 4, h, w); paper algorithm 2, or 3 when known_* are given.

    known_cells: bool (B, 1, h, w); known_latents: (B, 4, h, w) scaled mask latents of the known mask.
    resample: with known cells, each step is taken `resample` times, the result re-noised back to the step's
    noise level in between (RePaint's resampling, Lugmayr et al. 2022): the unknown cells get more passes to
    agree with the known ones. callback(t, latents) runs after every step (tests, visualisation).
    """
    device, dtype = image_latents.device, image_latents.dtype
    latents = torch.randn(image_latents.shape, generator=generator).to(device, dtype)
    x0 = torch.zeros_like(latents)
    passes = resample if known_cells is not None else 1
    for t in inference_timesteps(scheduler, steps):
        alpha, alpha_prev = (a.to(device, dtype) for a in (scheduler.alphas_cumprod[t],
                                                           previous_alpha_bar(scheduler, t, steps)))
        for attempt in range(passes):
            if attempt:                                  # back to step t's noise level with fresh noise
                noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
                latents = (alpha / alpha_prev).sqrt() * latents + (1 - alpha / alpha_prev).sqrt() * noise
            eps = predict_noise(unet, latents, image_latents, x0, t)
            x0 = predict_x0(scheduler, latents, eps, torch.tensor([t]))
            if known_cells is not None:
                x0 = torch.where(known_cells, known_latents, x0)
            latents = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
        if callback is not None:
            callback(t, latents)
    return latents
