"""Training the tiny SD: a few steps reduce the denoising loss; stages resume; no mask reaches training."""
import json

import numpy as np
import pytest
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


def test_probe_reports_object_and_among_objects_auc_per_layer(tmp_path):
    from diffseg_ros.core.attention import transformer_blocks
    from diffseg_ros.training.probe import probe
    torch.set_num_threads(1)
    parts = build_sd_components(model_configs(tiny_config(tmp_path)), seed=0)
    aucs = probe(parts, scenes=2, size=64)
    layers = [name for name, _ in transformer_blocks(parts.unet)]
    assert set(aucs) == {'object', 'among_objects'}
    for values in aucs.values():
        assert list(values) == layers
        assert all(0.0 <= v <= 1.0 for v in values.values() if v == v)
    assert any(v == v for v in aucs['among_objects'].values())      # scenes name several objects


def test_start_from_a_folder_resumes_its_model_with_identity_extra_text_layers(tmp_path):
    from dataclasses import replace
    from diffseg_ros.core.sd_models import save_sd_components
    from diffseg_ros.training.train_sd import start_from, text_layers
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    source = build_sd_components(model_configs(cfg), seed=3)
    save_sd_components(source, tmp_path / 'model')
    deeper = build_sd_components(model_configs(replace(cfg, text_layers=2)), seed=4)
    start_from(deeper, str(tmp_path / 'model'))
    ids = source.tokenizer(['a red mug and a blue striped bottle.'], padding='max_length', max_length=77,
                           return_tensors='pt').input_ids
    with torch.no_grad():
        torch.testing.assert_close(deeper.text_encoder(ids)[0], source.text_encoder(ids)[0])
        assert torch.count_nonzero(text_layers(deeper.text_encoder)[1].mlp.fc1.weight) > 0
        for name, tensor in source.unet.state_dict().items():
            assert torch.equal(deeper.unet.state_dict()[name], tensor)
    wider = build_sd_components(model_configs(replace(cfg, text_hidden=64)), seed=4)
    with pytest.raises((ValueError, RuntimeError)):
        start_from(wider, str(tmp_path / 'model'))


def test_start_from_a_text_only_fine_level_adds_self_attention_as_an_identity_residual(tmp_path):
    from dataclasses import replace
    from diffseg_ros.core.sd_models import save_sd_components
    from diffseg_ros.training.train_sd import start_from
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    source = build_sd_components(model_configs(cfg), seed=3)
    save_sd_components(source, tmp_path / 'model')
    finer = build_sd_components(model_configs(replace(cfg, fine_self_attention=True)), seed=4)
    start_from(finer, str(tmp_path / 'model'))
    fine = ['down_blocks.0.attentions.0', 'up_blocks.2.attentions.0', 'up_blocks.2.attentions.1']
    modules = dict(finer.unet.named_modules())
    for name in fine:
        attn1 = modules[f'{name}.transformer_blocks.0.attn1']
        assert not attn1.is_cross_attention and torch.count_nonzero(attn1.to_k.weight) > 0
        assert torch.count_nonzero(attn1.to_out[0].weight) == 0
    # Same function as the source without its fine level's first (text) attention.
    with torch.no_grad():
        source_modules = dict(source.unet.named_modules())
        for name in fine:
            out = source_modules[f'{name}.transformer_blocks.0.attn1'].to_out[0]
            out.weight.zero_()
            out.bias.zero_()
        x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, cfg.text_hidden)
        torch.testing.assert_close(finer.unet(x, t, encoder_hidden_states=text).sample,
                                   source.unet(x, t, encoder_hidden_states=text).sample)
    wider_cfg = replace(cfg, fine_self_attention=True, unet_channels=(16, 32, 64))
    wider = build_sd_components(model_configs(wider_cfg), seed=4)
    with pytest.raises(ValueError):
        start_from(wider, str(tmp_path / 'model'))


def test_cli_flags_set_boolean_options_both_ways():
    import argparse
    from diffseg_ros.training.train_sd import add_parser
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(['sd']).fine_self_attention is False
    assert parser.parse_args(['sd', '--fine-self-attention']).fine_self_attention is True
    assert parser.parse_args(['sd', '--no-fine-self-attention']).fine_self_attention is False
