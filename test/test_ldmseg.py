"""Tests of the LDMSeg core: bits, autoencoder, scheduler, loss weights, inpainting, PQ, labels, storage."""
import numpy as np
import pytest
import torch

from diffseg_ros.core.geometry import intrinsics, remap_labels, restore_labels
from diffseg_ros.ldmseg import LDMSeg, lift_labels, project_labels
from diffseg_ros.ldmseg.autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from diffseg_ros.ldmseg.bits import bits_to_ids, ids_to_bits
from diffseg_ros.ldmseg.inpaint import block_drop_mask, encode_known, known_cells
from diffseg_ros.ldmseg.losses import sample_logits, uncertain_pixels
from diffseg_ros.ldmseg.metrics import match_segments, panoptic_quality
from diffseg_ros.ldmseg.model import (ddim_sample, inference_timesteps, loss_weights, make_scheduler, snr,
                                      unet_config_from_sd, build_unet, init_from_sd)
from diffseg_ros.ldmseg.pipeline import assign_known_ids, postprocess
from tiny_models import tiny_random_ldmseg

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def tiny():
    return tiny_random_ldmseg(seed=0, size=32)


# --- bits ---------------------------------------------------------------------------------------------------
def test_bits_round_trip_every_id_and_ignore():
    ids = torch.arange(-1, 128).view(1, 1, 129).repeat(2, 3, 1)
    bits = ids_to_bits(ids)
    assert bits.shape == (2, 7, 3, 129)
    assert set(bits.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(bits[..., 0], torch.zeros(2, 7, 3))                # ignore -> all-zero bits
    five = torch.tensor([1., -1, 1, -1, -1, -1, -1])                     # 5 = 0b101, least significant first
    assert torch.equal(bits[:, :, 0, 1 + 5], five.repeat(2, 1))
    assert torch.equal(bits_to_ids(bits), ids)


def test_bits_reject_ids_beyond_seven_bits():
    with pytest.raises(ValueError):
        ids_to_bits(torch.tensor([[128]]))


# --- autoencoder --------------------------------------------------------------------------------------------
def test_autoencoder_paper_widths_shapes_and_size():
    ae = MaskAutoencoder(MaskAutoencoderConfig())
    assert ae.config.factor == 8
    assert 1.5e6 < sum(p.numel() for p in ae.parameters()) < 2.5e6      # the paper's ~2 M
    bits = ids_to_bits(torch.randint(0, 128, (2, 64, 48)))
    mean, logvar = ae.encode(bits)
    assert mean.shape == logvar.shape == (2, 4, 8, 6)
    assert ae.decoder(mean).shape == (2, 128, 32, 24)                    # half resolution before bilinear x2
    logits, _ = ae(bits)
    assert logits.shape == (2, 128, 64, 48)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in ae.decoder) == 2


def test_autoencoder_logits_start_as_a_bit_readout():
    readout = MaskAutoencoder(MaskAutoencoderConfig()).decoder[-1]
    weight = readout.weight[:, :, 0, 0]                                  # (128, D) = bit patterns @ P
    projection = (weight[2 ** torch.arange(7)] - weight[0]) / 2           # row of id 2^j minus id 0 = 2 P_j
    torch.testing.assert_close(weight, ids_to_bits(torch.arange(128).view(-1, 1, 1))[..., 0, 0] @ projection)
    assert torch.count_nonzero(readout.bias) == 0


def test_autoencoder_stages_follow_the_vae_factor():
    ae = MaskAutoencoder(MaskAutoencoderConfig.for_factor(4, decoder_channels=32))
    assert ae.config.encoder_channels == (32, 64, 128)
    assert ae.encode(ids_to_bits(torch.zeros(1, 128, 128, dtype=torch.long)))[0].shape == (1, 4, 32, 32)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in ae.decoder) == 1
    with pytest.raises(ValueError):
        MaskAutoencoderConfig.for_factor(3)


def test_loss_reads_logits_like_bilinear_upsampling():
    logits = torch.randn(2, 5, 6, 7)
    full = torch.nn.functional.interpolate(logits, size=(12, 14), mode='bilinear', align_corners=False)
    pixels = torch.stack([torch.randint(0, 12, (2, 50)), torch.randint(0, 14, (2, 50))], -1)
    expected = full[torch.arange(2)[:, None], :, pixels[..., 0], pixels[..., 1]]
    torch.testing.assert_close(sample_logits(logits, pixels, 12, 14), expected)
    chosen = uncertain_pixels(logits, 12, 14, 20, generator=torch.Generator().manual_seed(0))
    assert chosen.shape == (2, 20, 2) and chosen[..., 0].max() < 12 and chosen[..., 1].max() < 14


# --- scheduler and loss weights -----------------------------------------------------------------------------
def test_ddim_trailing_timesteps():
    scheduler = make_scheduler()
    assert inference_timesteps(scheduler, 50) == list(range(999, 0, -20))
    assert inference_timesteps(scheduler, 50)[-1] == 19
    assert inference_timesteps(scheduler, 10) == list(range(999, 0, -100))


def test_loss_weights_min_snr_two():
    scheduler = make_scheduler()
    t = torch.arange(1000)
    ratio = snr(scheduler, t)
    weights = loss_weights(scheduler, t)
    expected = torch.where(ratio > 2, 2 / ratio, torch.ones_like(ratio))
    torch.testing.assert_close(weights, expected)
    assert weights[999] == 1 and weights[0] < 0.01
    assert torch.all(weights[1:] >= weights[:-1])                       # noisier -> heavier, up to 1


class FakeUNet(torch.nn.Module):
    """eps = 0.1 x noisy latent + 0.05 x image latent: deterministic and cheap."""

    def forward(self, x, t):
        return type('Out', (), {'sample': 0.1 * x[:, :4] + 0.05 * x[:, 4:8]})()


def test_sampler_matches_diffusers_ddim_step():
    scheduler, unet = make_scheduler(), FakeUNet()
    image = torch.randn(2, 4, 8, 8)
    ours = ddim_sample(unet, scheduler, image, 5, torch.Generator().manual_seed(3))
    latents = torch.randn(image.shape, generator=torch.Generator().manual_seed(3))
    scheduler.set_timesteps(5)
    for t in scheduler.timesteps:
        eps = unet(torch.cat([latents, image, torch.zeros_like(latents)], 1), t).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(ours, latents)


# --- inpainting ---------------------------------------------------------------------------------------------
def test_known_cells_from_pixel_share():
    known = torch.zeros(1, 8, 8, dtype=torch.bool)
    known[0, :4, :4] = True              # cell (0, 0) fully known
    known[0, 0:2, 4:8] = True            # cell (0, 1) half known
    known[0, 4, 4] = True                # cell (1, 1) 1/16 known
    cells = known_cells(known, 4, 0.5)
    assert cells.shape == (1, 1, 2, 2)
    assert cells[0, 0].tolist() == [[True, True], [False, False]]
    assert known_cells(known, 4, 0.75)[0, 0].tolist() == [[True, False], [False, False]]


def test_inpainting_keeps_known_latents_exactly(tiny):
    image = torch.randn(1, 4, 16, 16)
    ids = torch.randint(1, 128, (1, 32, 32))
    known = torch.zeros(1, 32, 32, dtype=torch.bool)
    known[:, :, :16] = True
    cells = known_cells(known, 2)
    known_latents = encode_known(tiny.mask_autoencoder, ids, known, 0.7)
    seen = []
    out = ddim_sample(tiny.unet, tiny.scheduler, image, 4, torch.Generator().manual_seed(0), cells,
                      known_latents, callback=lambda t, z: seen.append(z.clone()))
    mask = cells.expand_as(out)
    assert torch.equal(out[mask], known_latents[mask])
    assert not torch.allclose(out[~mask], known_latents[~mask])
    assert len(seen) == 4 and not torch.equal(seen[0][mask], known_latents[mask])   # re-noised on the way


@pytest.mark.parametrize('with_known', [True, False])
def test_resampling_repeats_each_step_where_labels_are_known(tiny, with_known):
    image, calls = torch.randn(1, 4, 16, 16), []
    cells = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    cells[..., :8] = True
    known_latents = torch.randn(1, 4, 16, 16)
    forward = tiny.unet.forward
    tiny.unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        known = (cells, known_latents) if with_known else (None, None)
        out = ddim_sample(tiny.unet, tiny.scheduler, image, 4, torch.Generator().manual_seed(0), *known,
                          resample=3)
    finally:
        tiny.unet.forward = forward
    assert len(calls) == (12 if with_known else 4)          # RePaint's passes only when labels are known
    if with_known:
        mask = cells.expand_as(out)
        assert torch.equal(out[mask], known_latents[mask])
        once = ddim_sample(tiny.unet, tiny.scheduler, image, 4, torch.Generator().manual_seed(0), cells,
                           known_latents)
        assert not torch.allclose(out[~mask], once[~mask])   # the extra passes change the completion


def test_block_drop_mask_rate_and_blocks():
    mask = block_drop_mask(128, 128, 0.7, 16, np.random.default_rng(0))
    blocks = mask.reshape(8, 16, 8, 16).transpose(0, 2, 1, 3).reshape(64, -1)
    assert np.all(blocks.all(1) | ~blocks.any(1))                        # whole blocks kept or dropped
    assert 0.1 < mask.mean() < 0.5


# --- metrics ------------------------------------------------------------------------------------------------
def pq(pred, truth):
    return panoptic_quality([np.array([pred])], [np.array([truth])])


def test_pq_perfect_and_permuted_ids():
    truth = [1, 1, 2, 2, 2, 3]
    assert pq(truth, truth)['pq'] == 1.0
    result = pq([7, 7, 9, 9, 9, 4], truth)
    assert (result['pq'], result['sq'], result['rq'], result['tp']) == (1.0, 1.0, 1.0, 3)


def test_pq_hand_computed_partial_overlap():
    result = pq([1, 1, 1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    sq = (5 / 7 + 3 / 5) / 2                                            # IoUs 5/7 and 3/5
    assert result['tp'] == 2 and result['fp'] == 0 and result['fn'] == 0
    assert result['sq'] == pytest.approx(sq) and result['pq'] == pytest.approx(sq) and result['rq'] == 1.0


def test_pq_iou_of_one_half_is_not_a_match():
    result = pq([1, 1, 3, 3, 3, 3, 2, 2], [1, 1, 1, 1, 2, 2, 2, 2])
    assert (result['tp'], result['fp'], result['fn'], result['pq']) == (0, 3, 2, 0.0)


def test_pq_false_positive_and_unassigned_pixels():
    result = pq([1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1])
    assert (result['tp'], result['fp'], result['fn']) == (1, 1, 0)
    assert result['pq'] == pytest.approx((4 / 6) / 1.5) and result['rq'] == pytest.approx(1 / 1.5)
    assert pq([1, 1, 1, 0], [1, 1, 1, 1])['pq'] == pytest.approx(0.75)   # prediction void counts in the union


def test_pq_void_truth_leaves_union_and_hides_predictions():
    result = pq([1, 1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0, 0, 0])
    assert (result['tp'], result['fp'], result['fn'], result['pq']) == (1, 0, 0, 1.0)
    result = pq([1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 2, 0, 0, 0])     # 3/4 of segment 2 void: IoU 1
    assert result['pq'] == 1.0
    assert pq([0, 0], [0, 0]) == dict(pq=0.0, sq=0.0, rq=0.0, tp=0, fp=0, fn=0)


def test_pq_sums_counts_over_images():
    preds = [np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]])]
    truths = [np.array([[1, 1, 2, 2]]), np.array([[1, 1, 2, 2]])]
    result = panoptic_quality(preds, truths)
    assert (result['tp'], result['fp'], result['fn']) == (2, 1, 2)
    assert result['pq'] == pytest.approx(2 / (2 + 1.5))
    matches, _ = match_segments(preds[0], truths[0])
    assert matches == {1: (1, 1.0), 2: (2, 1.0)}


def test_postprocess_threshold_and_min_area():
    logits = torch.full((1, 128, 4, 4), -10.0)
    logits[0, 3] = 10.0                      # id 3 everywhere, confidently ...
    logits[0, 5, 0, 0] = 9.0                 # ... except an unsure pixel (p = 0.73)
    logits[0, 9, 3, 3] = 20.0                # and a one-pixel segment
    ids = postprocess(logits, 0.5, 2)[0]
    assert ids[0, 0] == 3 and ids[1, 1] == 3
    assert ids[3, 3] == 0                    # under the minimum area
    strict = postprocess(logits, 0.8, 2)[0]
    assert strict[0, 0] == 0 and strict[1, 1] == 3


def test_postprocess_fill_void_drops_splinters_and_fills_holes():
    logits = torch.full((1, 128, 8, 8), -10.0)
    logits[0, 1, :, :4] = 10.0               # id 1 on the left half, id 2 on the right half ...
    logits[0, 2, :, 4:] = 10.0
    logits[0, 2, 2, 1] = 30.0                # ... a one-pixel splinter of id 2 inside id 1
    logits[0, 1, 6:, 5:] = 0.0               # and an unsure patch (all ids equal) inside id 2
    logits[0, 2, 6:, 5:] = 0.0
    paper = postprocess(logits, 0.5, 3)[0]
    assert paper[2, 1] == 2 and (paper[6:, 5:] == 0).all()          # the paper keeps both
    dense = postprocess(logits, 0.5, 3, fill_void=True)[0]
    assert dense[2, 1] == 1                                        # the splinter joins its surroundings
    assert (dense[6:, 5:] == 2).all() and (dense > 0).all()        # the hole takes the nearest id
    assert (dense[:, :4] == 1).all() and (dense[:, 4:] == 2).all()


# --- labels and projection ----------------------------------------------------------------------------------
def test_label_remapping_round_trip():
    labels = np.array([[0, 5000, 5000, 7], [1003, 7, 0, 2 ** 40]])
    compact, table = remap_labels(labels)
    assert compact.dtype == np.int32 and compact.max() == 4 and np.all((compact == 0) == (labels == 0))
    assert np.array_equal(restore_labels(compact, table), labels)
    grown = compact.copy()
    grown[0, 0], grown[1, 2] = 5, 6                                   # ids the input did not have
    restored = restore_labels(grown, table)
    assert restored[0, 0] == 2 ** 40 + 1 and restored[1, 2] == 2 ** 40 + 2      # new segments: fresh ids
    assert np.array_equal(restored[labels != 0], labels[labels != 0])


def test_label_remapping_keeps_the_most_frequent_when_too_many():
    labels = np.repeat(np.arange(1, 131), np.arange(1, 131))          # label k appears k times
    compact, table = remap_labels(labels, max_id=127)
    assert len(table) == 128 and compact.max() == 127
    assert np.all(compact[labels <= 3] == 0) and np.all(compact[labels > 3] > 0)
    assert np.array_equal(restore_labels(compact, table)[labels > 3], labels[labels > 3])


def test_lift_and_project_round_trip():
    K = intrinsics(16, 12, 60.0)
    depth = np.full((12, 16), 2.0, np.float32)
    depth[0, 0] = np.inf
    labels = np.arange(12 * 16).reshape(12, 16) + 1
    pose = np.eye(4)
    pose[:3, 3] = [0.3, -0.2, 1.0]
    points, point_labels = lift_labels(depth, K, labels, pose)
    assert len(points) == 12 * 16 - 1
    image = project_labels(points, point_labels, K, 16, 12, cloud_to_camera=np.linalg.inv(pose))
    assert image[0, 0] == 0 and np.array_equal(image[depth < np.inf], labels[depth < np.inf])
    with pytest.raises(ValueError):
        project_labels(points, point_labels[:-1], K, 16, 12)


# --- pipeline -----------------------------------------------------------------------------------------------
def test_complete_keeps_known_ids_in_the_callers_id_space(tiny):
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    sparse = np.zeros((32, 32), np.int64)
    sparse[:16], sparse[16:, :8] = 5000, 7
    known = np.ones((32, 32), bool)
    known[:4] = False                                              # labelled but not trusted
    out = tiny.complete(rgb, sparse, known, steps=2)
    assert out.shape == (32, 32) and out.dtype == np.int64
    assert np.all(out[known & (sparse > 0)] == sparse[known & (sparse > 0)])
    assert set(np.unique(out)) <= {0, 7, 5000} | set(range(5001, 5200))
    batch = tiny.complete(np.stack([rgb, rgb]), np.stack([sparse, sparse]), steps=2)
    assert batch.shape == (2, 32, 32)
    assert np.all(batch[:, sparse > 0] == sparse[sparse > 0])


def test_sample_resizes_other_image_sizes(tiny):
    rgb = np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    ids = tiny.sample(rgb, steps=2)
    assert ids.shape == (24, 40) and ids.dtype == np.int32


def test_save_load_round_trip(tiny, tmp_path):
    for module in (tiny.vae, tiny.mask_autoencoder, tiny.unet):
        for p in module.parameters():
            p.data = p.data.half().float()                          # what fp16 storage keeps
    tiny.save(tmp_path / 'model')
    loaded = LDMSeg.load(str(tmp_path / 'model'))
    for name in ('vae', 'mask_autoencoder', 'unet'):
        ours, theirs = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.config == tiny.config
    rgb = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(tiny.encode_images(rgb[None]), loaded.encode_images(rgb[None]))
    assert np.array_equal(tiny.sample(rgb, steps=2), loaded.sample(rgb, steps=2))


def test_load_reports_missing_parts(tmp_path):
    from diffseg_ros.core.sd_models import ModelLoadError
    with pytest.raises(ModelLoadError, match='mask_autoencoder'):
        (tmp_path / 'm').mkdir()
        LDMSeg.load(str(tmp_path / 'm'))


def test_unet_from_sd_copies_weights_and_zero_inits_extra_inputs(tiny_model_dir):
    from diffusers import UNet2DConditionModel
    sd_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder='unet')
    unet = build_unet(unet_config_from_sd(dict(sd_unet.config), 16))
    assert unet.config.in_channels == 12 and unet.config.out_channels == 4
    assert unet.config.down_block_types == ('AttnDownBlock2D', 'AttnDownBlock2D', 'DownBlock2D')
    copied = init_from_sd(unet, sd_unet)
    assert 'conv_in.weight' in copied and 'time_embedding.linear_1.weight' in copied
    assert not any('attn2' in name for name in copied)
    assert torch.equal(unet.conv_in.weight[:, :4], sd_unet.conv_in.weight)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    torch.testing.assert_close(unet.down_blocks[0].resnets[0].conv1.weight,
                               sd_unet.down_blocks[0].resnets[0].conv1.weight)


def test_segments_take_the_label_most_of_their_known_pixels_carry():
    ids = np.zeros((6, 6), np.int32)
    ids[:, :3], ids[:, 3:] = 5, 9                  # two completed segments with fresh ids
    known = np.zeros((6, 6), np.int32)
    known[0, 0], known[2, 1], known[4, 0] = 1, 1, 2   # left segment: 2 of 3 known pixels say 1
    known[1, 4], known[3, 5] = 2, 2                 # right segment: 2
    out = assign_known_ids(ids, known)
    assert (out[known > 0] == known[known > 0]).all()            # known pixels keep their label
    assert (out[:, :3][known[:, :3] == 0] == 1).all()            # the majority takes the rest of the segment
    assert (out[:, 3:] == 2).all()
    assert (assign_known_ids(ids, np.zeros_like(known)) == ids).all()


def test_a_segment_holding_an_object_no_segment_took_is_split_by_nearest_known_pixel():
    ids = np.full((4, 8), 5, np.int32)              # the sample merged two objects into one segment
    known = np.zeros((4, 8), np.int32)
    known[1, 0], known[2, 1], known[1, 7] = 1, 1, 2    # 1 owns it; no segment took 2
    out = assign_known_ids(ids, known)
    assert (out[:, :4] == 1).all() and (out[:, 5:] == 2).all()
    ids[:, 6:] = 9                                  # now the sample draws object 2 on its own ...
    known[:, 6:] = 2
    known[0, 5] = 2                                 # ... and a known pixel of it spills into segment 5
    out = assign_known_ids(ids, known)
    assert (out[:, :6][known[:, :6] == 0] == 1).all() and out[0, 5] == 2 and (out[:, 6:] == 2).all()


def test_vote_keeps_the_majority_and_the_first_samples_added_segments():
    from diffseg_ros.ldmseg.pipeline import LDMSegConfig, vote_samples
    samples = np.array([[[1, 1, 2, 40, 40, 1]],
                        [[1, 2, 2, 50, 50, 60]],
                        [[2, 1, 2, 60, 1, 60]]])     # known ids 1, 2; 40, 50, 60 added by each sample
    config = LDMSegConfig(min_area=1, fill_void=False)
    merged = vote_samples(samples, np.array([1, 2]), config)
    assert merged.tolist() == [[1, 1, 2, 40, 40, 0]]   # added wins the last pixel, where sample 0 says 1
    config.fill_void = True
    assert vote_samples(samples, np.array([1, 2]), config).tolist() == [[1, 1, 2, 40, 40, 40]]


def test_complete_draws_its_samples_in_one_batch(tiny):
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    sparse = np.zeros((32, 32), np.int64)
    sparse[:8, :8], sparse[24:, 24:] = 3, 8
    batches, forward = [], tiny.unet.forward
    tiny.unet.forward = lambda sample, *a, **k: batches.append(len(sample)) or forward(sample, *a, **k)
    try:
        voted = tiny.complete(np.stack([rgb, rgb]), np.stack([sparse, sparse]), steps=2, samples=3)
    finally:
        tiny.unet.forward = forward
    assert batches == [6, 6]                                       # 2 images x 3 samples, one pass per step
    assert np.all(voted[:, sparse > 0] == sparse[sparse > 0])
    again = tiny.complete(rgb, sparse, steps=2, samples=3)
    assert np.array_equal(again, voted[0])                         # seeded: the same every time
    assert np.array_equal(tiny.complete(rgb, sparse, steps=2), tiny.complete(rgb, sparse, steps=2, samples=1))
    with pytest.raises(ValueError, match='samples must be >= 1'):
        tiny.complete(rgb, sparse, steps=2, samples=-1)


def test_known_segments_get_random_codes_and_added_segments_never_a_known_id():
    from diffseg_ros.ldmseg.pipeline import codes_to_compact, random_codes
    codes = random_codes(3, np.random.default_rng(0))
    assert codes[0] == 0 and len(set(codes[1:])) == 3 and all(1 <= c <= 127 for c in codes[1:])
    added = [c for c in (1, 2, 3, 4, 5) if c not in codes][:2]          # ids the model made up
    model_ids = np.array([[0, codes[2], codes[1], added[0]], [added[1], codes[3], added[0], 0]])
    compact = codes_to_compact(model_ids, codes)
    assert compact.tolist() == [[0, 2, 1, 4], [5, 3, 4, 0]]             # known codes -> 1..3, the rest above
