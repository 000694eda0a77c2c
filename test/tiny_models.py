"""Seeded tiny random models for tests.

An SD-architecture model (three UNet levels, real CLIP vocabulary) and an LDMSeg model built on a tiny
image VAE.
"""
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig

from diffseg_ros.core.sd_models import build_sd_components, save_sd_components
from diffseg_ros.ldmseg.autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from diffseg_ros.ldmseg.model import build_unet, unet_config
from diffseg_ros.ldmseg.pipeline import LDMSeg, LDMSegConfig, paper_min_area


def tiny_configs():
    """Configs of a seeded tiny SD-architecture model (three UNet levels, real CLIP vocabulary)."""
    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
               down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
               layers_per_block=1, norm_num_groups=8, sample_size=64)
    unet = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64, 64), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=8,
                down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'))
    return text, vae, unet


def save_tiny_random_model(out_dir, seed=0):
    """Save a seeded tiny random SD-architecture model as a diffusers folder."""
    return save_sd_components(build_sd_components(tiny_configs(), seed=seed), out_dir)


def tiny_random_ldmseg(seed=0, size=32):
    """Build a seeded, randomly initialised tiny LDMSeg (f = 2 image VAE)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_configs()[1])
    ae = MaskAutoencoder(MaskAutoencoderConfig.for_factor(2, (8, 16), decoder_channels=16, norm_groups=8))
    unet = build_unet(unet_config((16, 32), attention=(False, True), norm_num_groups=8, head_dim=8,
                                  sample_size=size // 2))
    config = LDMSegConfig(size=(size, size), image_scaling=float(vae.config.scaling_factor), steps=3,
                          min_area=paper_min_area(size, size), autoencoder=ae.config.to_dict())
    return LDMSeg(vae, ae, unet, config)


# --- other Stable Diffusion layouts (issue 19): a tiny seeded random pipeline per UNet structure ------------
def _sd_vae(levels):
    """Return a tiny VAE config with `levels` blocks (scale factor 2 ** (levels - 1))."""
    channels = (16, 16, 32, 32)[:levels]
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                down_block_types=('DownEncoderBlock2D',) * levels,
                up_block_types=('UpDecoderBlock2D',) * levels,
                layers_per_block=1, norm_num_groups=8, sample_size=64)


def _four_level_unet(**extra):
    """SD 1.x / 2.x UNet structure: cross-attention at three levels, two transformers per down block."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=32,
                norm_num_groups=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=8,
                down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3, **extra)


LAYOUTS = {
    'sd1': (_sd_vae(4), _four_level_unet(), 'epsilon'),
    # SD 2.x: linear projections, per-block head counts (diffusers' attention_head_dim), v-prediction
    'sd2': (_sd_vae(4), dict(_four_level_unet(use_linear_projection=True),
                             block_out_channels=(40, 40, 80, 80), attention_head_dim=(5, 10, 20, 20)),
            'v_prediction'),
    # two levels: cross-attention at the latent size and in the mid block only; 32-px training size
    'two_level': (_sd_vae(2), dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                   cross_attention_dim=32, norm_num_groups=8, block_out_channels=(32, 64),
                                   attention_head_dim=8,
                                   down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                   up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D')), 'epsilon'),
    'three_level': (tiny_configs()[1], tiny_configs()[2], 'epsilon'),
    # SDXL-style: extra conditioning on pooled text and image sizes (refused)
    'sdxl': (_sd_vae(2), dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                              cross_attention_dim=32, norm_num_groups=8, block_out_channels=(32, 64),
                              attention_head_dim=8, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                              up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
                              addition_embed_type='text_time', addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=32 + 6 * 8),
             'epsilon'),
}


def save_tiny_layout(name, out_dir, seed=0):
    """Save a seeded tiny random pipeline of a named UNet layout (LAYOUTS) as a diffusers folder.

    The tokenizer is the embedded model's (the real CLIP vocabulary); SDXL-style folders also get the
    second text encoder they carry.
    """
    import os
    import shutil
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer
    from diffseg_ros.core.sd_models import EMBEDDED_MODEL, SD_SCHEDULE
    vae, unet, prediction = LAYOUTS[name]
    parts = build_sd_components((tiny_configs()[0], vae, unet), seed=seed)
    parts.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(EMBEDDED_MODEL, 'tokenizer'))
    parts.scheduler = DDPMScheduler(**dict(SD_SCHEDULE, prediction_type=prediction))
    save_sd_components(parts, out_dir)
    if name == 'sdxl':
        shutil.copytree(os.path.join(out_dir, 'text_encoder'), os.path.join(out_dir, 'text_encoder_2'))
    return out_dir
