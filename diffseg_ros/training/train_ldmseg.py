"""Train LDMSeg on COCO-panoptic-format data (`diffseg train ldmseg`); LDMSeg paper section 3.

Stages, each resumable from its folder in the run directory (weights.safetensors, optimizer.pt, state.json):
  0. data         SynthWorld export to <out>/data when no data is given and none is there yet; images and
                  compact masks cached in memory (<out>/data_<size>.npz) unless --no-preload
  1. autoencoder  shallow mask autoencoder on bits of random ids; cross-entropy + BCE + Dice at sampled
                  pixels; AdamW weight decay instead of a KL term
  2. scaling      mask latent scaling = mask_latent_std / std(mask latents): a fixed, low signal level so the
                  denoiser must read the image (paper fig. 3 and its released settings scale by ~0.18)
  3. latents      image latents = SD VAE posterior mean x its scaling factor (cached when preloaded)
  4. unet         UNet2DModel initialised from the SD UNet where shapes match; epsilon loss weighted by
                  min(SNR, 2) / SNR, self-conditioning on half of each batch
  5. export       fp16 LDMSeg folder (config.json, mask_autoencoder.safetensors, unet/, vae/, scheduler/)
Batches and noise are seeded by (seed, step), so a resumed run draws what an uninterrupted one would.
--init-from DIR seeds a new run with an exported folder (autoencoder, scaling, UNet) to train its UNet on.
"""
from dataclasses import asdict, dataclass
import argparse
import json
import os
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core.images import to_pixels
from ..core.model_folder import ModelLoadError
from ..core.sd_models import EMBEDDED_NAME, resolve_model_path
from ..core.settings import add_arguments, from_arguments, setting
from ..core.train_loop import run_steps
from ..ldmseg.autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from ..ldmseg.bits import ids_to_bits
from ..ldmseg.data import PanopticData, dataset_paths, random_ids
from ..ldmseg.losses import reconstruction_loss
from ..ldmseg.metrics import panoptic_quality
from ..ldmseg.model import (build_unet, init_from_sd, make_scheduler, training_loss, unet_config,
                            unet_config_from_sd)
from ..ldmseg.pipeline import LDMSeg, LDMSegConfig, paper_min_area, postprocess
from .checkpoints import checkpoint_every, load_optimizer, load_stage, lr_factor, save_stage, stage_state, \
    start_run


@dataclass
class LDMSegTrainConfig:
    out: str = setting('runs/ldmseg', 'run folder (stages, caches); a rerun resumes it')
    data: str = setting('', "COCO-panoptic root, SynthWorld layout ('' = <out>/data, exported if missing)")
    annotations: str = setting('', 'real COCO: panoptic_train2017.json')
    images: str = setting('', 'real COCO: train2017/')
    masks: str = setting('', 'real COCO: panoptic_train2017/ (PNGs)')
    scenes: int = setting(10000, 'SynthWorld scenes to export when there is no data', low=1)
    first_seed: int = setting(0, 'scene seeds first_seed.. (held-out evaluation scenes start at 10^9)', low=0)
    preload: bool = setting(True, 'keep all images and masks in memory (off for real COCO)')
    sd_model: str = setting('', "SD folder: the image VAE and the UNet initialisation ('' = embedded)")
    init_from_sd: bool = setting(True, "initialise the denoiser from the SD UNet where shapes match")
    init_from: str = setting('', 'exported LDMSeg folder a new run continues (autoencoder, scaling, UNet)')
    size: int = setting(128, 'training image size in px', low=16)
    seed: int = setting(0, 'seed of batches and noise (per stage and step)')
    ae_widths: tuple[int, ...] = setting((16, 32, 64, 128),
                                         'mask encoder widths, first log2(f) + 1 used (paper 32..256)')
    ae_decoder_channels: int = setting(64, 'mask decoder width (paper 256)', low=1)
    ae_norm_groups: int = setting(16, 'GroupNorm groups of the mask autoencoder (paper 32)', low=1)
    ae_steps: int = setting(2000, 'mask autoencoder training steps', low=0)
    ae_batch: int = setting(16, 'mask autoencoder batch', low=1)
    ae_lr: float = setting(3e-3, 'mask autoencoder learning rate', low=0.0, open=('low',))
    ae_points: int = setting(1024, 'loss pixels per image (6 %; paper 12544 at 512 px, 4.8 %)', low=1)
    weight_decay: float = setting(0.05, 'AdamW weight decay of both stages (paper)', low=0.0)
    unet_channels: tuple[int, ...] = setting((32, 64, 128), 'denoiser widths (only without --init-from-sd)')
    unet_steps: int = setting(12000, 'denoiser training steps', low=0)
    batch: int = setting(16, 'denoiser batch', low=1)
    lr: float = setting(4e-4, 'denoiser learning rate', low=0.0, open=('low',))
    self_cond_prob: float = setting(0.5, 'share of each batch trained with self-conditioning', low=0.0,
                                    high=1.0)
    snr_gamma: float = setting(2.0, 'loss weight min(SNR, gamma) / SNR', low=0.0, open=('low',))
    mask_latent_std: float = setting(0.5, 'standard deviation the mask latents are scaled to', low=0.0,
                                     open=('low',))
    warmup: int = setting(200, 'learning-rate warm-up steps', low=0)
    checkpoint_every: int = setting(250, 'steps between checkpoints', low=1)
    threads: int = setting(2, 'CPU threads', low=1)
    workers: int = setting(2, 'processes for the SynthWorld export (0 = in this process)', low=0)
    device: str = setting('cpu', 'torch device')
    stage: str = setting('all', "'autoencoder' stops after the mask scaling (stage 2)",
                         choices=('all', 'autoencoder'))


# --- data and models --------------------------------------------------------------------------------------
def prepare_data(cfg):
    """Open the dataset, exporting SynthWorld scenes first when there is no data."""
    root = cfg.data or os.path.join(cfg.out, 'data')
    annotations, images, masks = dataset_paths(root, cfg.annotations, cfg.images, cfg.masks)
    if not annotations.is_file():
        if cfg.data or cfg.annotations:
            raise FileNotFoundError(f'no panoptic annotations at {annotations}')
        from ..synthworld.export import export_scenes
        bar = tqdm(total=cfg.scenes, desc='export SynthWorld')
        export_scenes(root, range(cfg.first_seed, cfg.first_seed + cfg.scenes), width=cfg.size,
                      depth_format='png16', workers=cfg.workers, progress=lambda: bar.update(1))
        bar.close()
    cache = os.path.join(cfg.out, f'data_{cfg.size}.npz') if cfg.preload else None
    return PanopticData(annotations, images, masks, cfg.size, preload=cfg.preload, cache=cache)


def load_sd_parts(sd_model, with_unet):
    """Load the SD image VAE (float32) and, when asked, its UNet."""
    path = resolve_model_path(sd_model, EMBEDDED_NAME)
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder='vae', local_files_only=True)
        unet = (UNet2DConditionModel.from_pretrained(path, subfolder='unet', local_files_only=True)
                if with_unet else None)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f'could not load the image VAE / UNet from {path}: {err}') from err
    return vae.eval().requires_grad_(False), unet


def vae_factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_models(cfg, vae, sd_unet=None):
    """Mask autoencoder with one stride-2 stage per factor 2 of the VAE, and the denoising UNet."""
    ae_config = MaskAutoencoderConfig.for_factor(vae_factor(vae), tuple(cfg.ae_widths),
                                                 decoder_channels=cfg.ae_decoder_channels,
                                                 norm_groups=cfg.ae_norm_groups)
    latent_size = cfg.size // vae_factor(vae)
    if sd_unet is not None:
        unet = build_unet(unet_config_from_sd(dict(sd_unet.config), latent_size))
        init_from_sd(unet, sd_unet)
    else:
        unet = build_unet(unet_config(tuple(cfg.unet_channels), sample_size=latent_size))
    return MaskAutoencoder(ae_config), unet


def _step_random(cfg, stage, step):
    """Return numpy and torch generators seeded by (seed, stage, step)."""
    return np.random.default_rng([cfg.seed, stage, step]), torch.Generator().manual_seed(
        (cfg.seed * 1_000_003 + stage) * 10_000_019 + step)


def mask_bits(segments, rng, device):
    """Random ids of a batch of compact masks, as (ids, bits) tensors."""
    ids = torch.from_numpy(random_ids(segments, rng)).to(device)
    return ids, ids_to_bits(ids)


def continue_from(cfg, vae, ae, unet):
    """Seed a new run with an exported LDMSeg folder's autoencoder, mask scaling, UNet and their steps.

    A run that already has checkpoints resumes those instead. The UNet then trains on from the folder's
    step up to --unet-steps (its cosine schedule follows the new total); the optimizer starts fresh. The
    folder's image VAE must be --sd-model's (up to fp16 storage), or its denoiser would read other latents.
    """
    if stage_state(os.path.join(cfg.out, 'autoencoder')) or stage_state(os.path.join(cfg.out, 'unet')):
        return
    source = LDMSeg.load(cfg.init_from)
    ours, theirs = vae.state_dict(), source.vae.state_dict()
    same_vae = ours.keys() == theirs.keys() and all(
        torch.allclose(v, theirs[k].to(v), rtol=1e-3, atol=1e-3) for k, v in ours.items())
    if not same_vae:
        raise ModelLoadError(f'--init-from {cfg.init_from} was trained with another image VAE than '
                             f'--sd-model {resolve_model_path(cfg.sd_model, EMBEDDED_NAME)}')
    try:
        ae.load_state_dict(source.mask_autoencoder.state_dict())
        unet.load_state_dict(source.unet.state_dict())
    except RuntimeError as err:
        raise ModelLoadError(f'--init-from {cfg.init_from} does not fit this run\'s models: '
                             f'{str(err).splitlines()[0]}') from None
    training = source.config.training
    ae_state = training.get('autoencoder', {})
    metrics = {k: v for k, v in ae_state.items() if k not in ('step', 'time')}
    save_stage(os.path.join(cfg.out, 'autoencoder'), ae, None, ae_state.get('step', cfg.ae_steps),
               dict(metrics, continued_from=source.path))
    save_stage(os.path.join(cfg.out, 'unet'), unet, None, training.get('unet', {}).get('step', 0),
               dict(continued_from=source.path))
    with open(os.path.join(cfg.out, 'mask_scaling.json'), 'w') as f:
        json.dump(dict(mask_scaling=source.config.mask_scaling, continued_from=source.path), f)


# --- stage 1: autoencoder ----------------------------------------------------------------------------------
def train_autoencoder(cfg, ae, data):
    path = os.path.join(cfg.out, 'autoencoder')
    done = load_stage(path, ae)
    ae.to(cfg.device)
    if done < cfg.ae_steps:
        opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=cfg.weight_decay)
        load_optimizer(path, opt)
        ae.train()
        parts = {}

        def loss_of_step(step):
            rng, gen = _step_random(cfg, 1, step)
            _, segments = data.batch(rng.integers(0, len(data), cfg.ae_batch))
            flip = rng.random(len(segments)) < 0.5
            segments[flip] = segments[flip, :, ::-1]
            ids, bits = mask_bits(segments, rng, cfg.device)
            mean, logvar = ae.encode(bits)
            latent = mean + torch.randn(mean.shape, generator=gen).to(mean) * (0.5 * logvar).exp()
            loss, found = reconstruction_loss(ae.decoder(latent), ids, cfg.ae_points, gen)
            parts.update(found)
            return loss, dict(ce=f"{found['ce']:.3f}")

        def metrics(done, loss, ema):
            final = reconstruction_pq(cfg, ae, data) if done == cfg.ae_steps else {}
            return dict(loss_ema=ema, **parts, **final)
        run_steps(loss_of_step, opt, done, cfg.ae_steps, 'autoencoder',
                  lr=schedule(cfg.ae_lr, cfg.ae_steps, cfg),
                  after_step=checkpoint_every(path, ae, opt, cfg.checkpoint_every, cfg.ae_steps, metrics))
    return ae.eval().requires_grad_(False)


def schedule(peak, total, cfg):
    """Learning rate per step: warm-up (at most a tenth of the steps), then cosine to 10 %."""
    return lambda step: peak * lr_factor(step, total, min(cfg.warmup, total // 10 + 1))


@torch.no_grad()
def reconstruction_pq(cfg, ae, data, count=64):
    """Class-agnostic PQ of decode(encode(mask)) on `count` training masks (paper's post-processing)."""
    ae.eval()
    rng = np.random.default_rng([cfg.seed, 9])
    _, segments = data.batch(rng.choice(len(data), min(count, len(data)), replace=False))
    ids, bits = mask_bits(segments, rng, cfg.device)
    preds = postprocess(ae.decode(ae.encode(bits)[0]), 0.5, paper_min_area(cfg.size, cfg.size)).cpu().numpy()
    truth = ids.clamp(min=0).cpu().numpy()
    ae.train()
    return {f'reconstruction_{k}': v for k, v in panoptic_quality(preds, truth).items()}


# --- stages 2 and 3: scaling and image latents --------------------------------------------------------------
@torch.no_grad()
def mask_latent_scaling(cfg, ae, data, count=512):
    """Scale that gives the mask latents a standard deviation of cfg.mask_latent_std (cached)."""
    path = os.path.join(cfg.out, 'mask_scaling.json')
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)['mask_scaling']
    rng = np.random.default_rng([cfg.seed, 2])
    stds = []
    for start in range(0, min(count, len(data)), 64):
        _, bits = mask_bits(data.batch(rng.integers(0, len(data), 64))[1], rng, cfg.device)
        stds.append(ae.encode(bits)[0].float().std().item())
    scaling = cfg.mask_latent_std / float(np.mean(stds))
    with open(path, 'w') as f:
        json.dump(dict(mask_scaling=scaling, latent_std=float(np.mean(stds))), f)
    return scaling


@torch.no_grad()
def encode_images(vae, rgb, device):
    return vae.encode(to_pixels(rgb).to(device)).latent_dist.mean * vae.config.scaling_factor


def image_latents(cfg, vae, data):
    """Scaled image latents of the whole (preloaded) dataset, cached in the run folder; None when lazy."""
    if data.rgb is None:
        return None
    path = os.path.join(cfg.out, 'image_latents.safetensors')
    if os.path.isfile(path):
        cached = load_file(path)['latents']
        if len(cached) == len(data):
            return cached
    chunks = [encode_images(vae, data.rgb[i:i + 32], cfg.device).cpu()
              for i in tqdm(range(0, len(data), 32), desc='image latents')]
    latents = torch.cat(chunks).contiguous()
    save_file({'latents': latents}, path)
    return latents


# --- stage 4: denoiser --------------------------------------------------------------------------------------
def train_denoiser(cfg, unet, ae, vae, data, latents, scaling):
    path = os.path.join(cfg.out, 'unet')
    done = load_stage(path, unet)
    unet.to(cfg.device)
    if done >= cfg.unet_steps:
        return unet.eval()
    scheduler = make_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    load_optimizer(path, opt)
    unet.train()

    def loss_of_step(step):
        rng, gen = _step_random(cfg, 4, step)
        idx = rng.integers(0, len(data), cfg.batch)
        rgb, segments = data.batch(idx)
        _, bits = mask_bits(segments, rng, cfg.device)
        with torch.no_grad():
            mask_latents = ae.encode(bits)[0] * scaling
        image = latents[idx].to(cfg.device) if latents is not None else encode_images(vae, rgb, cfg.device)
        return training_loss(unet, scheduler, mask_latents, image, cfg.self_cond_prob, cfg.snr_gamma, gen)
    run_steps(loss_of_step, opt, done, cfg.unet_steps, 'unet', lr=schedule(cfg.lr, cfg.unet_steps, cfg),
              after_step=checkpoint_every(path, unet, opt, cfg.checkpoint_every, cfg.unet_steps,
                                          lambda done, loss, ema: dict(loss_ema=ema)))
    return unet.eval()


# --- main ---------------------------------------------------------------------------------------------------
def train(cfg, export_dir=None):
    """Run (or resume) the stages; returns the LDMSeg model (None after --stage autoencoder)."""
    start_run(cfg)
    started = time.time()
    data = prepare_data(cfg)
    vae, sd_unet = load_sd_parts(cfg.sd_model, cfg.init_from_sd)
    vae.to(cfg.device)
    ae, unet = build_models(cfg, vae, sd_unet)
    if cfg.init_from:
        continue_from(cfg, vae, ae, unet)
    ae = train_autoencoder(cfg, ae, data)
    ae_state = stage_state(os.path.join(cfg.out, 'autoencoder'))
    tqdm.write(f"autoencoder: step {ae_state.get('step')}, "
               f"reconstruction PQ {_number(ae_state, 'reconstruction_pq')}")
    scaling = mask_latent_scaling(cfg, ae, data)
    if cfg.stage == 'autoencoder':
        return None
    latents = image_latents(cfg, vae, data)
    unet = train_denoiser(cfg, unet, ae, vae, data, latents, scaling)
    provenance = dict(data=str(cfg.data or os.path.join(cfg.out, 'data')), images=len(data),
                      config=asdict(cfg), autoencoder=stage_state(os.path.join(cfg.out, 'autoencoder')),
                      unet=stage_state(os.path.join(cfg.out, 'unet')),
                      seconds_this_run=round(time.time() - started))
    config = LDMSegConfig(size=(cfg.size, cfg.size), image_scaling=float(vae.config.scaling_factor),
                          mask_scaling=float(scaling), min_area=paper_min_area(cfg.size, cfg.size),
                          autoencoder=ae.config.to_dict(),
                          training=json.loads(json.dumps(provenance, default=str)))
    model = LDMSeg(vae.cpu(), ae.cpu(), unet.cpu(), config)
    if export_dir:
        model.save(export_dir, half=True)
        write_model_card(export_dir, cfg, model)
    return model


def command_line(cfg):
    """Spell `cfg` as a `diffseg train ldmseg` command (flags that differ from the defaults)."""
    defaults, flags = asdict(LDMSegTrainConfig()), []
    for name, value in asdict(cfg).items():
        if value == defaults[name]:
            continue
        flag = '--' + name.replace('_', '-')
        if isinstance(value, bool):
            flags.append(flag if value else '--no-' + flag[2:])
        else:
            flags.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, tuple) else value}")
    return 'diffseg train ldmseg ' + ' '.join(flags)


def _number(state, key, digits=3):
    value = state.get(key)
    return f'{value:.{digits}f}' if isinstance(value, (int, float)) else 'n/a'


def write_model_card(path, cfg, model):
    """Write MODEL_CARD.md: how the folder was made (command, seeds, steps) and the training numbers."""
    training, config = model.config.training, model.config
    ae, unet = training.get('autoencoder', {}), training.get('unet', {})
    seeds = f'{cfg.first_seed}..{cfg.first_seed + cfg.scenes - 1}'
    lines = [
        '# LDMSeg SynthWorld model', '',
        'LDMSeg (Van Gansbeke & De Brabandere, 2024): class-agnostic panoptic masks and mask inpainting by',
        'latent diffusion; trained by `diffseg_ros/training/train_ldmseg.py`.', '',
        f'- command: `{command_line(cfg)} --export {path}`',
        f'- data: {training.get("images")} images at {cfg.size} px from {training.get("data")}'
        f' (SynthWorld seeds {seeds} when exported by the trainer); training seed {cfg.seed}',
        f'- image VAE: copied from `{resolve_model_path(cfg.sd_model, EMBEDDED_NAME)}`,'
        f' {_parameters(model.vae):,} parameters, factor {model.factor},'
        f' latent scaling {config.image_scaling:.5g}',
        f'- mask autoencoder: {_parameters(model.mask_autoencoder):,} parameters, {ae.get("step")} steps of'
        f' batch {cfg.ae_batch}; reconstruction PQ {_number(ae, "reconstruction_pq")}'
        f' (SQ {_number(ae, "reconstruction_sq")}, RQ {_number(ae, "reconstruction_rq")})',
        f'- denoiser: UNet2DModel, {_parameters(model.unet):,} parameters, initialised from SD:'
        f' {cfg.init_from_sd}; {unet.get("step")} steps of batch {cfg.batch}; final loss (EMA)'
        f' {_number(unet, "loss_ema", 4)}; mask latent scaling {config.mask_scaling:.5g}',
        f'- inference defaults: {config.steps} DDIM steps (trailing), softmax >= {config.mask_threshold},'
        f' segments >= {config.min_area} px, a latent cell is known at >= {config.known_min_fraction:.0%}'
        f' known pixels; fill_void {config.fill_void}',
        '', '## Evaluation', '', f'Run `diffseg eval ldmseg --model {path}` and record its numbers here.', '']
    with open(os.path.join(path, 'MODEL_CARD.md'), 'w') as f:
        f.write('\n'.join(lines))


def _parameters(module):
    return sum(p.numel() for p in module.parameters())


def add_parser(subparsers):
    """Register `ldmseg` on the `diffseg train` verbs."""
    parser = subparsers.add_parser('ldmseg', help='train LDMSeg (mask autoencoder, then denoiser; resumable)',
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, LDMSegTrainConfig)
    parser.add_argument('--export', default=None, help='write the fp16 LDMSeg folder here when done')
    parser.set_defaults(func=lambda a: train(from_arguments(LDMSegTrainConfig, a), a.export) and None)
    return parser


if __name__ == '__main__':
    main_parser = argparse.ArgumentParser(prog='train_ldmseg')
    add_parser(main_parser.add_subparsers(dest='verb', required=True))
    parsed = main_parser.parse_args()
    parsed.func(parsed)
