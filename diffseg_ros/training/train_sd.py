"""Train the embedded tiny Stable Diffusion on SynthWorld images and captions (never masks).

Stages, each resumable from its checkpoint in the run folder:
  1. data:  render N scenes (RGB + objects, for captions); cached as data.npz
  2. vae:   AutoencoderKL (f=4) on the images; latent scaling factor = 1 / std of the latents
  3. unet:  CLIPTextModel + UNet2DConditionModel trained jointly on the latents, epsilon prediction,
            SD's noise schedule, captions re-phrased at every use, caption dropout for text dependence
  4. export: fp16 diffusers folder + diffseg_defaults.json
With --init-from an SD folder (e.g. the embedded model), stage 2 is skipped and stage 3 starts from that
folder's VAE, text encoder and UNet; text layers the folder lacks start as the identity (zero output
projections), so the run resumes the folder's model exactly and learns the new layers from there.
"""
from dataclasses import dataclass
import json
from functools import partial
import multiprocessing
import os
import re
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPTextConfig

from ..core.images import to_pixels
from ..core.sd_models import build_sd_components, load_sd_components, save_sd_components
from ..core.settings import add_arguments, from_arguments, setting
from ..core.train_loop import run_steps
from ..synthworld import generate_scene
from ..synthworld.captions import make_caption
from .checkpoints import checkpoint_every, load_optimizer, load_stage, lr_factor, start_run
from .probe import probe


@dataclass
class TrainConfig:
    out: str = setting('runs/sd', 'run folder (checkpoints, data, latents); a rerun resumes it')
    size: int = setting(128, 'training image size in px', low=16)
    scenes: int = setting(20000, 'SynthWorld scenes rendered for training (seeds seed * 10^7 + i)', low=1)
    seed: int = setting(0, 'seed of the data, initialisation and batches')
    vae_steps: int = setting(2500, 'VAE training steps', low=0)
    vae_crop: int = setting(64, 'VAE training crop size in px', low=8)
    unet_steps: int = setting(5000, 'UNet + text encoder training steps', low=0)
    batch: int = setting(32, 'UNet batch (the VAE takes a quarter)', low=1)
    vae_lr: float = setting(5e-4, 'VAE learning rate', low=0.0, open=('low',))
    unet_lr: float = setting(8e-4, 'UNet + text encoder peak learning rate (warm-up, cosine to 10 %)',
                             low=0.0, open=('low',))
    text_hidden: int = setting(128, 'text encoder width', low=8)
    text_layers: int = setting(3, 'text encoder transformer layers', low=0)
    unet_channels: tuple[int, ...] = setting((32, 64, 128), 'UNet block widths, one per resolution level')
    caption_dropout: float = setting(0.1, 'share of empty captions (text dependence)', low=0.0, high=1.0)
    pattern_probability: float = setting(0.5, "chance a template caption names a patterned object's pattern",
                                         low=0.0, high=1.0)
    init_from: str = setting('', "SD folder to start from ('' = train from scratch)")
    fine_self_attention: bool = setting(False, 'the 32x32 transformers attend to the image too, not only '
                                               'the text')
    checkpoint_every: int = setting(500, 'steps between checkpoints', low=1)
    probe_every: int = setting(1000, 'steps between per-layer localisation AUC probes on held-out scenes '
                                     '(0 = off)', low=0)
    threads: int = setting(2, 'CPU threads (and rendering processes)', low=1)


def model_configs(cfg):
    """Configs of the embedded model: f=4 VAE (128 px -> 32x32 latent); cross-attention at 32, 16 and 8.

    Without `fine_self_attention` the 32x32 transformers attend to the text only (`only_cross_attention`,
    v2-v4): self-attention over 1,024 positions is the largest CPU cost of a step. With it they keep
    self-attention (as in SD), the finest affinity T2M's SelfCross can propagate through. Every head is
    32 channels wide.
    """
    text = CLIPTextConfig(vocab_size=49408, hidden_size=cfg.text_hidden,
                          intermediate_size=cfg.text_hidden * 4, num_hidden_layers=cfg.text_layers,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=cfg.text_hidden)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
               down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3,
               layers_per_block=1, norm_num_groups=16, sample_size=cfg.size)
    c = tuple(cfg.unet_channels)
    unet = dict(sample_size=cfg.size // 4, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=c,
                cross_attention_dim=cfg.text_hidden, attention_head_dim=tuple(max(1, ch // 32) for ch in c),
                only_cross_attention=[not cfg.fine_self_attention, False, False], norm_num_groups=16,
                down_block_types=('CrossAttnDownBlock2D',) * 3, up_block_types=('CrossAttnUpBlock2D',) * 3)
    return text, vae, unet


# --- stage 1: data ---------------------------------------------------------------------------------------
def build_dataset(cfg):
    path = os.path.join(cfg.out, 'data.npz')
    if os.path.isfile(path):
        data = np.load(path, allow_pickle=False)
        return data['images'], json.loads(str(data['objects']))
    images, objects = np.zeros((cfg.scenes, cfg.size, cfg.size, 3), np.uint8), []
    seeds = [cfg.seed * 10_000_000 + i for i in range(cfg.scenes)]
    with multiprocessing.get_context('spawn').Pool(cfg.threads) as pool:
        rendered = pool.imap(partial(render_for_training, size=cfg.size), seeds, chunksize=64)
        for i, (rgb, meta) in enumerate(tqdm(rendered, total=len(seeds), desc='render scenes')):
            images[i] = rgb
            objects.append(meta)
    np.savez(path, images=images, objects=json.dumps(objects))
    return images, objects


def render_for_training(seed, size):
    """RGB and what a caption needs (never the instance image)."""
    scene = generate_scene(seed, width=size, height=size)
    setting = scene.spec.setting
    return scene.rgb, dict(setting=setting, surface=scene.spec.surfaces[setting].split('/')[0],
                           objects=[dict(category=o.category, colour=o.colour, pattern=o.pattern)
                                    for o in scene.objects])


def training_caption(scene, rng, pattern_probability=0.5):
    """Phrase a scene's caption afresh at every use, some in the engine's composed-prompt style.

    The segmenter asks "a photo including red mug, blue bottle, table, and floor."; training on that
    phrasing too (from objects only, never masks) keeps inference prompts in the training distribution.
    Patterns are the detail noise hides first while colour and place still show, so naming them asks the
    model to bind each pattern word to its object.
    """
    objs = [SimpleNamespace(**o) for o in scene['objects']]
    if rng.random() < 0.7 or not objs:
        return make_caption(objs, scene['setting'], scene['surface'], rng, pattern_probability)
    phrases = [f'{o.colour} {o.category}' for o in (objs[i] for i in rng.permutation(len(objs)))]
    words = phrases + [scene['setting']] * int(rng.random() < 0.5)
    prefix = ('a photo including', 'a photo of')[int(rng.integers(2))]
    return prefix + ' ' + (', '.join(words[:-1]) + ', and ' + words[-1] if len(words) > 1 else words[0]) + '.'


# --- stage 2: VAE ----------------------------------------------------------------------------------------
def train_vae(cfg, vae_cfg, images, rng):
    path = os.path.join(cfg.out, 'vae')
    vae = AutoencoderKL(**vae_cfg)
    done = load_stage(path, vae)
    if done >= cfg.vae_steps:
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    load_optimizer(path, opt)
    vae.train()
    last = {}

    def loss_of_step(step):
        x = to_pixels(random_crops(images, rng, cfg.batch // 4, cfg.vae_crop))  # conv VAE: crops suffice
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        last['rec_loss'] = rec_loss.item()
        return rec_loss + 1e-6 * posterior.kl().mean(), dict(rec=f"{last['rec_loss']:.4f}")
    run_steps(loss_of_step, opt, done, cfg.vae_steps, 'vae', clip=None,
              after_step=checkpoint_every(path, vae, opt, cfg.checkpoint_every, cfg.vae_steps,
                                          lambda *_: dict(last)))
    vae.eval()
    return vae


def random_crops(images, rng, count, size):
    idx = rng.integers(0, len(images), count)
    y, x = rng.integers(0, images.shape[1] - size + 1, 2)
    return images[idx, y:y + size, x:x + size]


@torch.no_grad()
def encode_latents(cfg, vae, images):
    path = os.path.join(cfg.out, 'latents.safetensors')
    if os.path.isfile(path):
        cached = load_file(path)
        vae.config.scaling_factor = float(cached['scaling'])
        return cached['latents']
    vae.eval()
    chunks = [vae.encode(to_pixels(images[i:i + 64])).latent_dist.mean
              for i in tqdm(range(0, len(images), 64), desc='encode latents')]
    latents = torch.cat(chunks)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    save_file({'latents': latents.contiguous(), 'scaling': torch.tensor(scaling)}, path)
    return latents


# --- stage 3: text encoder + UNet --------------------------------------------------------------------------
def train_unet(cfg, parts, latents, objects):
    path = os.path.join(cfg.out, 'unet')
    text_encoder, unet = parts.text_encoder, parts.unet
    done = load_stage(path, unet, text_encoder)
    if done >= cfg.unet_steps:
        return
    for module in (unet, text_encoder):
        module.requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    load_optimizer(path, opt)
    rng = np.random.default_rng([cfg.seed, done])   # a resumed run does not replay the first batches
    unet.train()
    text_encoder.train()

    def lr(step):
        return cfg.unet_lr * lr_factor(step, cfg.unet_steps)

    def loss_of_step(step):
        idx = rng.integers(0, len(latents), cfg.batch)
        x0 = latents[idx]
        flip = torch.from_numpy(rng.random(cfg.batch) < 0.5)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        captions = [training_caption(objects[i], rng, cfg.pattern_probability)
                    if rng.random() >= cfg.caption_dropout else '' for i in idx]
        t = torch.from_numpy(rng.integers(0, parts.scheduler.config.num_train_timesteps, cfg.batch)).long()
        return denoising_loss(parts, x0, captions, t, torch.randn_like(x0)), dict(lr=f'{lr(step):.1e}')

    def metrics(done, loss, ema):
        out = dict(loss_ema=ema)
        if cfg.probe_every and done % cfg.probe_every == 0:
            aucs = probe(parts, scenes=8, size=cfg.size)
            out['layer_auc'], out['layer_auc_among_objects'] = aucs['object'], aucs['among_objects']
            for kind, values in aucs.items():
                listed = ', '.join(f'{v:.2f}' for v in values.values())
                tqdm.write(f'step {done} layer AUC ({kind}): {listed}')
            unet.train()
            text_encoder.train()
        return out
    run_steps(loss_of_step, opt, done, cfg.unet_steps, 'unet', lr=lr,
              after_step=checkpoint_every(path, unet, opt, cfg.checkpoint_every, cfg.unet_steps, metrics,
                                          text_encoder))
    unet.eval()
    text_encoder.eval()


def denoising_loss(parts, x0, captions, t, noise):
    """Return the Stable Diffusion loss: predict the noise added to latents x0 at t, given captions."""
    ids = parts.tokenizer(captions, padding='max_length', max_length=77, truncation=True,
                          return_tensors='pt').input_ids
    noisy = parts.scheduler.add_noise(x0, noise, t)
    pred = parts.unet(noisy, t, encoder_hidden_states=parts.text_encoder(ids)[0]).sample
    return F.mse_loss(pred, noise)


# --- main --------------------------------------------------------------------------------------------------
def train(cfg, export_dir=None):
    """Run (or resume) every stage; export the fp16 diffusers folder when export_dir is given."""
    start_run(cfg)
    rng = np.random.default_rng(cfg.seed)
    text_cfg, vae_cfg, unet_cfg = model_configs(cfg)
    images, objects = build_dataset(cfg)
    parts = build_sd_components((text_cfg, vae_cfg, unet_cfg), seed=cfg.seed)
    if cfg.init_from:
        start_from(parts, cfg.init_from)
    else:
        parts.vae = train_vae(cfg, vae_cfg, images, rng)
    latents = encode_latents(cfg, parts.vae, images)
    train_unet(cfg, parts, latents, objects)
    if export_dir:
        export(parts, export_dir)
    return parts


def start_from(parts, path):
    """Copy an SD folder's VAE, text encoder and UNet weights into `parts`.

    Text layers `parts` has beyond the folder's keep their fresh weights with zeroed output projections
    (attention out_proj, MLP fc2): residual blocks that pass their input through unchanged. Transformers
    whose first attention was text-only in the folder and attends to the image in `parts` get fresh
    key/value projections and a zeroed output projection: the block starts as the folder's without
    that attention and learns it from there.
    """
    source = load_sd_components(path)
    parts.vae = source.vae
    gained = load_gaining_self_attention(parts.unet, source.unet.state_dict(), path)
    missing, unexpected = parts.text_encoder.load_state_dict(source.text_encoder.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f'text encoder of {path} does not fit the configured one: {unexpected[:3]}')
    new_layers = text_layers(parts.text_encoder)[source.text_encoder.config.num_hidden_layers:]
    if len(missing) != sum(len(layer.state_dict()) for layer in new_layers):
        raise ValueError(f'text encoder of {path} does not fit the configured one: {missing[:3]}')
    with torch.no_grad():
        for linear in [m for layer in new_layers for m in (layer.self_attn.out_proj, layer.mlp.fc2)] + gained:
            linear.weight.zero_()
            linear.bias.zero_()
    return parts


def load_gaining_self_attention(unet, state, path):
    """Load a UNet state; return the output projections of attentions that became self-attention.

    Only `attn1.to_k` / `attn1.to_v` may differ in shape (text width -> image width); the rest must fit.
    """
    target = unet.state_dict()
    unfit = [k for k, v in state.items() if k not in target or target[k].shape != v.shape]
    if any(not re.search(r'\.attn1\.to_[kv]\.weight$', k) for k in unfit) or set(target) - set(state):
        raise ValueError(f'UNet of {path} does not fit the configured one: {unfit[:3]}')
    unet.load_state_dict({k: v for k, v in state.items() if k not in unfit}, strict=False)
    modules = dict(unet.named_modules())
    return [modules[name].to_out[0] for name in dict.fromkeys(k.rsplit('.', 2)[0] for k in unfit)]


def text_layers(text_encoder):
    """Return the transformer layers of a CLIPTextModel (transformers 4 nests them in text_model, 5 not)."""
    return getattr(text_encoder, 'text_model', text_encoder).encoder.layers


def export_checkpoint(cfg, out_dir):
    """Export the latest checkpoints of a (possibly still running) training run without training."""
    text_cfg, vae_cfg, unet_cfg = model_configs(cfg)
    parts = build_sd_components((text_cfg, vae_cfg, unet_cfg), seed=cfg.seed)
    if cfg.init_from:
        parts.vae = load_sd_components(cfg.init_from).vae
    else:
        parts.vae = AutoencoderKL(**vae_cfg)
        load_stage(os.path.join(cfg.out, 'vae'), parts.vae)
    parts.vae.register_to_config(
        scaling_factor=float(load_file(os.path.join(cfg.out, 'latents.safetensors'))['scaling']))
    step = load_stage(os.path.join(cfg.out, 'unet'), parts.unet, parts.text_encoder)
    export(parts, out_dir)
    return step


def export(parts, out_dir, defaults=None):
    """Write the fp16 diffusers folder the node loads (plus diffseg_defaults.json when given)."""
    save_sd_components(parts, out_dir, half=True)
    if defaults:
        with open(os.path.join(out_dir, 'diffseg_defaults.json'), 'w') as f:
            json.dump(defaults, f, indent=1)
    return out_dir


def add_parser(subparsers):
    parser = subparsers.add_parser('sd', help='train the tiny SynthWorld Stable Diffusion (resumable)')
    add_arguments(parser, TrainConfig)
    parser.add_argument('--export', default=None, help='write the fp16 diffusers folder here when done')
    parser.add_argument('--export-only', action='store_true',
                        help='export the latest checkpoints, no training')
    parser.set_defaults(func=run_cli)


def run_cli(args):
    cfg = from_arguments(TrainConfig, args)
    if args.export_only:
        if not args.export:
            raise SystemExit('--export-only needs --export DIR')
        print(f'exported step {export_checkpoint(cfg, args.export)} to {args.export}')
        return 0
    train(cfg, args.export)
    return 0
