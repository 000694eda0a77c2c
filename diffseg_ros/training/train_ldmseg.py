"""Train LDMSeg on COCO-panoptic-format data (`diffseg train ldmseg`); paper section 3, REFERENCE.md 6.

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

from ..core.sd_models import ModelLoadError, resolve_model_path
from ..ldmseg.autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from ..ldmseg.bits import ids_to_bits
from ..ldmseg.data import PanopticData, dataset_paths, random_ids
from ..ldmseg.losses import reconstruction_loss
from ..ldmseg.metrics import panoptic_quality
from ..ldmseg.model import (build_unet, init_from_sd, make_scheduler, training_loss, unet_config,
                            unet_config_from_sd)
from ..ldmseg.pipeline import LDMSeg, LDMSegConfig, paper_min_area, postprocess
from .checkpoints import load_optimizer, load_stage, lr_factor, save_stage, stage_state, start_run


@dataclass
class LDMSegTrainConfig:
    out: str = 'runs/ldmseg'
    data: str = ''                 # COCO-panoptic root, SynthWorld layout ('' = <out>/data, made if missing)
    annotations: str = ''          # real COCO: panoptic_train2017.json
    images: str = ''               # real COCO: train2017/
    masks: str = ''                # real COCO: panoptic_train2017/ (PNGs)
    scenes: int = 10000            # SynthWorld scenes to export when there is no data
    first_seed: int = 0            # seeds first_seed.. (held-out evaluation scenes start at 10^9)
    preload: bool = True           # keep all images and masks in memory (off for real COCO)
    sd_model: str = ''             # SD folder: the image VAE and the UNet initialisation ('' = embedded)
    init_from_sd: bool = True
    init_from: str = ''            # exported LDMSeg folder a new run continues (autoencoder, scaling, UNet)
    size: int = 128
    seed: int = 0
    ae_widths: tuple = (16, 32, 64, 128)   # encoder widths, first log2(f) + 1 used (paper 32..256)
    ae_decoder_channels: int = 64          # paper 256
    ae_norm_groups: int = 16               # paper 32
    ae_steps: int = 2000
    ae_batch: int = 16
    ae_lr: float = 3e-3
    ae_points: int = 1024                  # loss pixels per image (6 %; paper 12544 at 512 px, 4.8 %)
    weight_decay: float = 0.05             # paper (both stages)
    unet_channels: tuple = (32, 64, 128)   # only without --init-from-sd
    unet_steps: int = 12000
    batch: int = 16
    lr: float = 4e-4
    self_cond_prob: float = 0.5
    snr_gamma: float = 2.0
    mask_latent_std: float = 0.5
    warmup: int = 200
    checkpoint_every: int = 250
    threads: int = 2
    workers: int = 2               # processes for the SynthWorld export
    device: str = 'cpu'
    stage: str = 'all'             # 'autoencoder' stops after stage 2


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
    path = resolve_model_path(sd_model)
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


def _set_lr(opt, lr):
    for group in opt.param_groups:
        group['lr'] = lr


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
                             f'--sd-model {resolve_model_path(cfg.sd_model)}')
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
        ema = None
        bar = tqdm(range(done, cfg.ae_steps), desc='autoencoder', initial=done, total=cfg.ae_steps)
        for step in bar:
            rng, gen = _step_random(cfg, 1, step)
            _, segments = data.batch(rng.integers(0, len(data), cfg.ae_batch))
            flip = rng.random(len(segments)) < 0.5
            segments[flip] = segments[flip, :, ::-1]
            ids, bits = mask_bits(segments, rng, cfg.device)
            mean, logvar = ae.encode(bits)
            latent = mean + torch.randn(mean.shape, generator=gen).to(mean) * (0.5 * logvar).exp()
            loss, parts = reconstruction_loss(ae.decoder(latent), ids, cfg.ae_points, gen)
            _set_lr(opt, cfg.ae_lr * lr_factor(step, cfg.ae_steps, min(cfg.warmup, cfg.ae_steps // 10 + 1)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.set_postfix(loss=f'{ema:.3f}', ce=f"{parts['ce']:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.ae_steps:
                metrics = dict(loss_ema=ema, **parts)
                if step + 1 == cfg.ae_steps:
                    metrics.update(reconstruction_pq(cfg, ae, data))
                save_stage(path, ae, opt, step + 1, metrics)
    return ae.eval().requires_grad_(False)


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
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return vae.encode(pixels.to(device)).latent_dist.mean * vae.config.scaling_factor


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
    ema = None
    bar = tqdm(range(done, cfg.unet_steps), desc='unet', initial=done, total=cfg.unet_steps)
    for step in bar:
        rng, gen = _step_random(cfg, 4, step)
        idx = rng.integers(0, len(data), cfg.batch)
        rgb, segments = data.batch(idx)
        _, bits = mask_bits(segments, rng, cfg.device)
        with torch.no_grad():
            mask_latents = ae.encode(bits)[0] * scaling
        image = latents[idx].to(cfg.device) if latents is not None else encode_images(vae, rgb, cfg.device)
        loss = training_loss(unet, scheduler, mask_latents, image, cfg.self_cond_prob, cfg.snr_gamma, gen)
        _set_lr(opt, cfg.lr * lr_factor(step, cfg.unet_steps, min(cfg.warmup, cfg.unet_steps // 10 + 1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f'{ema:.4f}')
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            save_stage(path, unet, opt, step + 1, dict(loss_ema=ema))
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
        f'- image VAE: copied from `{resolve_model_path(cfg.sd_model)}`,'
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


def config_from_args(args):
    fields = asdict(LDMSegTrainConfig())
    return LDMSegTrainConfig(**{k: (tuple(v) if isinstance(fields[k], tuple) else v)
                                for k, v in vars(args).items() if k in fields})


def add_parser(subparsers):
    """Register `ldmseg` on the `diffseg train` verbs."""
    parser = subparsers.add_parser('ldmseg', help='train LDMSeg (mask autoencoder, then denoiser; resumable)',
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(LDMSegTrainConfig()).items():
        flag = '--' + name.replace('_', '-')
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs='+', default=list(value))
        elif name == 'stage':
            parser.add_argument(flag, choices=('all', 'autoencoder'), default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument('--export', default=None, help='write the fp16 LDMSeg folder here when done')
    parser.set_defaults(func=lambda a: train(config_from_args(a), a.export) and None)
    return parser


if __name__ == '__main__':
    main_parser = argparse.ArgumentParser(prog='train_ldmseg')
    add_parser(main_parser.add_subparsers(dest='verb', required=True))
    parsed = main_parser.parse_args()
    parsed.func(parsed)
