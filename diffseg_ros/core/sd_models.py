"""Load Stable Diffusion components from a local diffusers folder, offline; build seeded random ones.

The folder layout is the one of a diffusers Stable Diffusion checkpoint:
tokenizer/, text_encoder/, vae/, unet/, scheduler/ (one config + weights per component).
"""
import copy
from dataclasses import dataclass
import hashlib
import json
import os

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .clip_vocab import write_clip_tokenizer
from .model_folder import DTYPES, ModelLoadError, needs, needs_any, require_complete, resolve_model_path, \
    torch_dtype

EMBEDDED_NAME = 'sd-synthworld'
EMBEDDED_MODEL = resolve_model_path('', EMBEDDED_NAME)
WEIGHT_FILES = ('model.safetensors', 'diffusion_pytorch_model.safetensors', 'pytorch_model.bin',
                'diffusion_pytorch_model.bin')
REQUIREMENTS = [
    needs_any(('tokenizer/vocab.json', 'tokenizer/merges.txt'), ('tokenizer/tokenizer.json',)),
    *[need for part in ('text_encoder', 'vae', 'unet') for need in (
        needs(f'{part}/config.json'),
        needs_any(*[(f'{part}/{w}',) for w in WEIGHT_FILES], label=f'{part}/ weights (*.safetensors)'))],
    needs('scheduler/scheduler_config.json'),
]
# SD 1.x noise schedule (the papers' model).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule='scaled_linear', clip_sample=False, steps_offset=1,
                   prediction_type='epsilon')


@dataclass
class SDComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    path: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self):
        return self.vae.config.scaling_factor

    @property
    def native_image_size(self):
        """Image size the model was trained at (what diffusers pipelines generate by default)."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def pad_multiple(self):
        """Input sizes must be a multiple of this so every UNet level has an integer size."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def fingerprint(self):
        """Short hash identifying the base model (configs and token embeddings), for concept and head files.

        Config keys naming the folder or library versions ('_name_or_path', 'transformers_version', ...) are
        left out: the same model must keep its fingerprint in another checkout or installation.
        """
        digest = hashlib.sha256()
        configs = [{k: v for k, v in config.items() if not (k.startswith('_') or k.endswith('_version'))}
                   for config in (self.text_encoder.config.to_dict(), dict(self.unet.config))]
        digest.update(json.dumps(configs, sort_keys=True, default=str).encode())
        emb = self.text_encoder.get_input_embeddings().weight[:4096].detach().float().cpu()
        digest.update(emb.numpy().tobytes())
        return digest.hexdigest()[:16]


def load_sd_components(model_path='', device='cpu', dtype='float32'):
    """Load tokenizer, text encoder, VAE, UNet and scheduler from a local folder with no network access."""
    path = resolve_model_path(model_path, EMBEDDED_NAME)
    require_complete(path, REQUIREMENTS, 'Stable Diffusion')
    refuse_unsupported_layout(path)
    dtype, dev = torch_dtype(dtype), torch.device(device)
    kwargs = dict(local_files_only=True, torch_dtype=dtype)
    try:
        components = SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder='tokenizer', local_files_only=True),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder='text_encoder', **kwargs),
            vae=AutoencoderKL.from_pretrained(path, subfolder='vae', **kwargs),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder='unet', **kwargs),
            scheduler=DDPMScheduler.from_pretrained(path, subfolder='scheduler', local_files_only=True),
            path=path, device=dev, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f'could not load Stable Diffusion from {path}: {err}') from err
    check_parts_fit(components)
    for module in (components.text_encoder, components.vae, components.unet):
        module.to(dev).eval().requires_grad_(False)
    use_fused_attention(components)
    return components


def use_fused_attention(parts):
    """Give every attention layer of the UNet and VAE diffusers' SDPA processor (AttnProcessor2_0).

    diffusers picks it by default on torch 2, but a folder or library default could choose another; set
    explicitly, every layer a frame does not capture runs the fused kernel (flash / memory-efficient
    attention on CUDA), and AttentionCapture restores it after each frame.
    """
    for module in (parts.unet, parts.vae):
        module.set_attn_processor(AttnProcessor2_0())


def refuse_unsupported_layout(path):
    """Raise ModelLoadError for UNets conditioned on more than one text encoder's tokens (SDXL and kin)."""
    try:
        with open(os.path.join(path, 'unet', 'config.json'), encoding='utf-8') as f:
            unet = json.load(f)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f'unreadable {path}/unet/config.json: {err}') from None
    extra = {key: unet.get(key) for key in ('addition_embed_type', 'class_embed_type', 'encoder_hid_dim_type')
             if unet.get(key)}
    if extra or os.path.isdir(os.path.join(path, 'text_encoder_2')):
        what = ', '.join(f'{k}={v!r}' for k, v in extra.items()) or 'a second text encoder'
        raise ModelLoadError(f'{path} is an SDXL-style model ({what}); only the SD 1.x / 2.x layout (one '
                             'text encoder, UNet conditioned on its tokens only) is supported')


def check_parts_fit(parts):
    """Raise ModelLoadError when the loaded parts cannot run together (text width, latent channels)."""
    unet, text, vae = parts.unet.config, parts.text_encoder.config, parts.vae.config
    if unet.cross_attention_dim != text.hidden_size:
        raise ModelLoadError(f'{parts.path}: the UNet attends to {unet.cross_attention_dim}-wide text '
                             'features '
                             f'but the text encoder gives {text.hidden_size}')
    if unet.in_channels != vae.latent_channels:
        raise ModelLoadError(f'{parts.path}: the UNet takes {unet.in_channels} channels but the VAE gives '
                             f'{vae.latent_channels}')


def save_sd_components(components, out_dir, half=False):
    """Write the components as a diffusers folder (safetensors; fp16 when half)."""
    os.makedirs(out_dir, exist_ok=True)
    components.tokenizer.save_pretrained(os.path.join(out_dir, 'tokenizer'))
    components.scheduler.save_pretrained(os.path.join(out_dir, 'scheduler'))
    for name in ('text_encoder', 'vae', 'unet'):
        module = getattr(components, name)
        if half:
            module = _half_copy(module)
        module.save_pretrained(os.path.join(out_dir, name), safe_serialization=True)
    return out_dir


def _half_copy(module):
    return copy.deepcopy(module).half()


def sd15_configs():
    """Configs of the Stable Diffusion 1.5 architecture (for benchmarks with random weights)."""
    text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
                          projection_dim=768)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
               down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
               layers_per_block=2, sample_size=512)
    unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)  # diffusers defaults = SD 1.x
    return text, vae, unet


def build_sd_components(configs, seed=0, tokenizer_dir=None, device='cpu', dtype='float32'):
    """Build randomly initialised components from (text, vae, unet) configs, seeded."""
    text_cfg, vae_cfg, unet_cfg = configs
    torch.manual_seed(seed)
    tokenizer_dir = tokenizer_dir or os.path.join(os.path.expanduser('~'), '.cache', 'diffseg_ros',
                                                  'clip-tokenizer')
    if os.path.isfile(os.path.join(tokenizer_dir, 'vocab.json')):
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = write_clip_tokenizer(tokenizer_dir)
    parts = SDComponents(tokenizer=tokenizer, text_encoder=CLIPTextModel(text_cfg),
                         vae=AutoencoderKL(**vae_cfg),
                         unet=UNet2DConditionModel(**unet_cfg), scheduler=DDPMScheduler(**SD_SCHEDULE),
                         path='', device=torch.device(device), dtype=DTYPES[dtype])
    for module in (parts.text_encoder, parts.vae, parts.unet):
        module.to(parts.device, parts.dtype).eval().requires_grad_(False)
    use_fused_attention(parts)
    return parts
