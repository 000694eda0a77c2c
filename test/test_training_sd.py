"""Training the tiny SD: a few steps reduce the denoising loss; stages resume; no mask reaches training."""
import json

import numpy as np
import torch

from diffseg_ros.core.sd_models import build_sd_components
from diffseg_ros.training.train_sd import (TrainConfig, build_dataset, denoising_loss, encode_latents,
                                           model_configs, render_for_training, train_unet, train_vae,
                                           training_caption)


def tiny_config(out):
    return TrainConfig(out=str(out), size=32, scenes=8, vae_steps=4, vae_crop=32, unet_steps=40, batch=8,
                       unet_lr=2e-3, unet_channels=(16, 32, 32), text_hidden=32, text_layers=1,
                       checkpoint_every=20, threads=1)


def test_training_data_holds_images_and_caption_facts_only():
    rgb, meta = render_for_training(7, size=32)
    assert rgb.shape == (32, 32, 3)
    assert set(meta) == {'setting', 'surface', 'objects'}
    assert all(set(o) == {'category', 'colour', 'pattern'} for o in meta['objects'])
    caption = training_caption(meta, np.random.default_rng(0))
    assert all(o['category'] in caption for o in meta['objects'])


def test_few_unet_steps_reduce_denoising_loss_and_resume(tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    images, objects = build_dataset(cfg)
    assert set(np.load(tmp_path / 'data.npz').files) == {'images', 'objects'}
    vae = train_vae(cfg, model_configs(cfg)[1], images, np.random.default_rng(0))
    latents = encode_latents(cfg, vae, images)
    assert abs(latents.std().item() - 1.0) < 1e-3, 'latents scaled to unit variance'
    parts = build_sd_components(model_configs(cfg), seed=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = latents[:8], torch.randn(latents[:8].shape, generator=g)
    t = torch.linspace(50, 950, 8).long()
    captions = [training_caption(o, np.random.default_rng(1)) for o in objects]
    with torch.no_grad():
        before = denoising_loss(parts, x0, captions, t, noise).item()
    train_unet(cfg, parts, latents, objects)
    with torch.no_grad():
        after = denoising_loss(parts, x0, captions, t, noise).item()
    assert after < 0.9 * before, (before, after)
    state = json.loads((tmp_path / 'unet' / 'state.json').read_text())
    assert state['step'] == 40
    resumed = build_sd_components(model_configs(cfg), seed=1)
    cfg.unet_steps = 41
    train_unet(cfg, resumed, latents, objects)
    assert json.loads((tmp_path / 'unet' / 'state.json').read_text())['step'] == 41
