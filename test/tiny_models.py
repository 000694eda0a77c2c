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
