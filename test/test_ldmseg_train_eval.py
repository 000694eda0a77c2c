"""LDMSeg training and evaluation: a few steps reduce the losses; the CLIs run end to end on tiny data."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

from diffseg_ros.core.settings import from_arguments
from diffseg_ros.ldmseg import LDMSeg
from diffseg_ros.ldmseg.autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from diffseg_ros.ldmseg.bits import ids_to_bits
from diffseg_ros.ldmseg.data import random_ids
from diffseg_ros.ldmseg.losses import reconstruction_loss
from diffseg_ros.ldmseg.model import build_unet, make_scheduler, training_loss, unet_config
from diffseg_ros.ldmseg.pipeline import fill_from_nearest
from diffseg_ros.tools import eval_ldmseg
from diffseg_ros.training import train_ldmseg
from tiny_models import tiny_random_ldmseg

torch.set_num_threads(1)


def toy_segments(count=4, size=32):
    """Blocky masks: 2-4 rectangles per image on a background segment."""
    rng = np.random.default_rng(0)
    segments = np.ones((count, size, size), np.uint8)
    for image in segments:
        for k in range(2, 2 + rng.integers(1, 4)):
            r, c = rng.integers(0, size - 8, 2)
            image[r:r + rng.integers(4, 12), c:c + rng.integers(4, 12)] = k
    return segments


def test_autoencoder_steps_reduce_loss():
    torch.manual_seed(0)
    ae = MaskAutoencoder(MaskAutoencoderConfig.for_factor(2, (8, 16), decoder_channels=16, norm_groups=8))
    ids = torch.from_numpy(random_ids(toy_segments(), np.random.default_rng(1)))
    bits = ids_to_bits(ids)

    def loss():
        logits = ae.decoder(ae.encode(bits)[0])
        return reconstruction_loss(logits, ids, 256, torch.Generator().manual_seed(0))[0]
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3, weight_decay=0.05)
    before = loss().item()
    for _ in range(40):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss().item() < 0.8 * before


def test_denoiser_steps_reduce_loss():
    torch.manual_seed(0)
    unet = build_unet(unet_config((16, 32), attention=(False, True), norm_num_groups=8, head_dim=8,
                                  sample_size=8))
    scheduler = make_scheduler()
    mask_latents, image_latents = torch.randn(4, 4, 8, 8) * 0.5, torch.randn(4, 4, 8, 8)

    def loss():
        generator = torch.Generator().manual_seed(0)
        return training_loss(unet, scheduler, mask_latents, image_latents, generator=generator)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    before = loss().item()
    for _ in range(30):
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss().item() < 0.8 * before


def train_args(tmp_path, sd_dir, **changes):
    parser = argparse.ArgumentParser()
    train_ldmseg.add_parser(parser.add_subparsers())
    argv = ['ldmseg', '--out', str(tmp_path / 'run'), '--sd-model', sd_dir, '--scenes', '6', '--workers', '0',
            '--size', '32', '--ae-widths', '8', '16', '--ae-decoder-channels', '16', '--ae-norm-groups', '8',
            '--ae-batch', '2', '--ae-points', '128', '--batch', '2', '--checkpoint-every', '2',
            '--threads', '1']
    for key, value in changes.items():
        argv += [f'--{key}'.replace('_', '-')] + ([str(value)] if value is not None else [])
    return parser.parse_args(argv)


def test_training_cli_runs_resumes_and_exports(tmp_path, tiny_model_dir):
    args = train_args(tmp_path, tiny_model_dir, ae_steps=2, unet_steps=2, stage='autoencoder')
    assert train_ldmseg.train(from_arguments(train_ldmseg.LDMSegTrainConfig, args)) is None
    state = json.loads((tmp_path / 'run' / 'autoencoder' / 'state.json').read_text())
    assert state['step'] == 2 and 'reconstruction_pq' in state
    assert (tmp_path / 'run' / 'data' / 'panoptic.json').is_file()
    args = train_args(tmp_path, tiny_model_dir, ae_steps=4, unet_steps=3, export=str(tmp_path / 'model'))
    args.func(args)                                             # resumes the autoencoder at step 2
    assert json.loads((tmp_path / 'run' / 'autoencoder' / 'state.json').read_text())['step'] == 4
    assert json.loads((tmp_path / 'run' / 'unet' / 'state.json').read_text())['step'] == 3
    model = LDMSeg.load(str(tmp_path / 'model'))
    assert model.config.size == (32, 32) and model.factor == 2
    assert model.config.training['unet']['step'] == 3
    assert tuple(model.unet.config.down_block_types) == ('AttnDownBlock2D', 'AttnDownBlock2D', 'DownBlock2D')
    card = (tmp_path / 'model' / 'MODEL_CARD.md').read_text()
    assert '--ae-steps 4' in card and 'reconstruction PQ' in card
    for name in os.listdir(tmp_path / 'model' / 'unet'):
        assert not name.endswith('.bin')
    rgb = np.zeros((32, 32, 3), np.uint8)
    assert model.sample(rgb, steps=2).shape == (32, 32)


def _tensors(module):
    return {k: v.float() for k, v in module.state_dict().items()}


def test_init_from_continues_an_exported_model(tmp_path, tiny_model_dir):
    first = train_args(tmp_path, tiny_model_dir, ae_steps=2, unet_steps=2, export=str(tmp_path / 'model'))
    first.func(first)
    source = LDMSeg.load(str(tmp_path / 'model'))
    same = train_args(tmp_path, tiny_model_dir, ae_steps=2, unet_steps=2, out=str(tmp_path / 'run2'),
                      init_from=str(tmp_path / 'model'), export=str(tmp_path / 'same'))
    same.func(same)                                   # nothing left to train: the export is the source
    copy = LDMSeg.load(str(tmp_path / 'same'))
    for a, b in ((source.unet, copy.unet), (source.mask_autoencoder, copy.mask_autoencoder)):
        assert all(torch.equal(x, _tensors(b)[k]) for k, x in _tensors(a).items())
    assert copy.config.mask_scaling == source.config.mask_scaling
    more = train_args(tmp_path, tiny_model_dir, ae_steps=2, unet_steps=4, out=str(tmp_path / 'run2'),
                      init_from=str(tmp_path / 'model'), export=str(tmp_path / 'more'))
    more.func(more)                                   # resumes run2 at step 2, trains steps 3 and 4
    trained = LDMSeg.load(str(tmp_path / 'more'))
    assert trained.config.training['unet']['step'] == 4
    assert not all(torch.equal(x, _tensors(trained.unet)[k]) for k, x in _tensors(source.unet).items())
    assert '--init-from' in (tmp_path / 'more' / 'MODEL_CARD.md').read_text()


def test_init_from_refuses_a_model_of_another_vae(tmp_path, tiny_model_dir):
    from diffseg_ros.core.model_folder import ModelLoadError
    from tiny_models import save_tiny_random_model
    other_sd = save_tiny_random_model(str(tmp_path / 'other-sd'), seed=1)
    first = train_args(tmp_path, tiny_model_dir, ae_steps=2, unet_steps=1, export=str(tmp_path / 'model'))
    first.func(first)
    args = train_args(tmp_path, other_sd, ae_steps=2, unet_steps=2, out=str(tmp_path / 'run2'),
                      init_from=str(tmp_path / 'model'))
    with pytest.raises(ModelLoadError, match='another image VAE'):
        args.func(args)
    assert not (tmp_path / 'run2' / 'unet').exists()


def test_eval_runs_end_to_end(tmp_path):
    tiny_random_ldmseg(seed=0, size=32).save(tmp_path / 'model')
    parser = argparse.ArgumentParser()
    eval_ldmseg.add_parser(parser.add_subparsers())
    args = parser.parse_args(['ldmseg', '--model', str(tmp_path / 'model'), '--out', str(tmp_path / 'eval'),
                              '--scenes', '2', '--steps', '2', '--steps-list', '2', '3',
                              '--drop-rates', '0.5', '0.9', '--blocks', '4', '8', '--sequences', '1',
                              '--frames', '3', '--sequence-steps', '2', '--batch', '2', '--threads', '1',
                              '--samples', '2'])
    assert args.func(args) == 0
    report = json.loads((tmp_path / 'eval' / 'report.json').read_text())
    assert report['inference']['samples'] == 2 and report['inference']['fill_void'] is True
    assert set(report['steps']) == {'2', '3'}
    assert set(report['sparsity']) == {'ldmseg', 'nearest', 'projected'}
    assert set(report['sparsity']['nearest']['8']) == {'0.5', '0.9'}
    assert 0 <= report['sparsity']['nearest']['8']['0.5']['pq'] <= 1
    sparsity = report['sparsity']
    assert sparsity['projected']['4']['0.9']['pq'] <= sparsity['nearest']['4']['0.9']['pq'] + 1e-9
    assert len(report['sequence']['ldmseg']['runs'][0]) == 2
    assert 'inpaint_vs_nearest_d0.9_B4' in report['bars']
    for name in ('sparsity', 'steps', 'sequence', 'examples'):
        assert os.path.isfile(tmp_path / 'eval' / f'{name}.png')


def test_nearest_fill_and_truth():
    sparse = np.zeros((5, 5), np.int64)
    sparse[0, 0], sparse[4, 4] = 3, 9
    filled = fill_from_nearest(sparse)
    assert filled[1, 0] == 3 and filled[3, 4] == 9 and filled[0, 4] in (3, 9)
    assert np.array_equal(fill_from_nearest(np.zeros((2, 2), np.int64)), np.zeros((2, 2)))
    truth = eval_ldmseg.panoptic_truth(np.array([[0, 4], [0, 0]]), np.array([[2, 0], [0, 1]]))
    assert truth.tolist() == [[1002, 4], [0, 1001]]


@pytest.mark.parametrize('drop', [0.0, 1.0])
def test_projected_baseline_extremes(drop):
    truth = np.arange(64).reshape(8, 8) // 16 + 1
    from diffseg_ros.ldmseg.inpaint import block_drop_mask
    kept = np.where(block_drop_mask(8, 8, drop, 4, np.random.default_rng(0)), truth, 0)
    assert (kept != 0).mean() == 1.0 - drop
