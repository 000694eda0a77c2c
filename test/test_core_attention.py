"""Attention capture: same outputs as the stock processors, SD 1.5 layer table, fused products vs naive."""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from diffseg_ros.core.attention import (AttentionCapture, LayerQK, propagate, resolve_layers,
                                        transformer_blocks)
from diffseg_ros.core.methods import stableseg, t2m
from diffseg_ros.core.methods.common import minmax

# SD 1.x transformer blocks in forward order and their size at 512 px input (as T2M numbers them).
SD15_TABLE = [
    ('down_blocks.0.attentions.0', 64), ('down_blocks.0.attentions.1', 64),
    ('down_blocks.1.attentions.0', 32), ('down_blocks.1.attentions.1', 32),
    ('down_blocks.2.attentions.0', 16), ('down_blocks.2.attentions.1', 16),
    ('mid_block.attentions.0', 8),
    ('up_blocks.1.attentions.0', 16), ('up_blocks.1.attentions.1', 16), ('up_blocks.1.attentions.2', 16),
    ('up_blocks.2.attentions.0', 32), ('up_blocks.2.attentions.1', 32), ('up_blocks.2.attentions.2', 32),
    ('up_blocks.3.attentions.0', 64), ('up_blocks.3.attentions.1', 64), ('up_blocks.3.attentions.2', 64),
]


def sd15_shaped_unet():
    """SD 1.5 block structure (4 levels, 2 layers per block) with narrow channels, so it runs fast."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=64, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                                cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()


def test_forward_order_matches_reference_table():
    unet = sd15_shaped_unet()
    names = [name for name, _ in transformer_blocks(unet)]
    assert names == [name for name, _ in SD15_TABLE]
    suffix = '.transformer_blocks.0.attn1.processor'
    registration = [n[:-len(suffix)] for n in unet.attn_processors if 'attn1' in n]
    assert registration != names, 'attn_processors order differs from forward order (the trap of section 2)'
    assert resolve_layers(unet, [4, 8, 11]) == ['down_blocks.2.attentions.0', 'up_blocks.1.attentions.1',
                                                'up_blocks.2.attentions.1']
    with pytest.raises(ValueError, match='16 transformer blocks'):
        resolve_layers(unet, [16])


def test_captured_sizes_match_sd15_table_at_512px():
    unet = sd15_shaped_unet()
    names = [name for name, _ in SD15_TABLE]
    latents, text = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 16)
    with torch.no_grad(), AttentionCapture(unet, cross=names, self_qk=names) as cap:
        cap.run(latents, torch.tensor([1]), text)
    for name, size in SD15_TABLE:
        assert cap.self_qk[name].size == (size, size)
        assert cap.cross[name].shape == (1, size * size, 77)
        assert torch.allclose(cap.cross[name].sum(-1), torch.ones(1, size * size), atol=1e-4)


def test_capture_output_equals_stock_processor_output():
    unet = sd15_shaped_unet()
    latents, text, t = torch.randn(2, 4, 32, 48), torch.randn(2, 77, 16), torch.tensor([150, 150])
    with torch.no_grad():
        stock = unet(latents, t, encoder_hidden_states=text).sample
        names = [name for name, _ in SD15_TABLE]
        with AttentionCapture(unet, cross=names, self_qk=names) as cap:
            captured = cap.run(latents, t, text)
        restored = unet(latents, t, encoder_hidden_states=text).sample
    assert torch.allclose(stock, captured, atol=1e-4)
    assert torch.equal(stock, restored), 'processors are restored on exit'


def test_capture_keeps_only_what_is_asked():
    unet = sd15_shaped_unet()
    with torch.no_grad(), AttentionCapture(unet, cross=['mid_block.attentions.0'],
                                           self_qk=['up_blocks.2.attentions.1']) as cap:
        cap.run(torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.randn(1, 77, 16))
    assert list(cap.cross) == ['mid_block.attentions.0']
    assert list(cap.self_qk) == ['up_blocks.2.attentions.1']
    assert cap.self_qk['up_blocks.2.attentions.1'].size == (8, 8)


def random_layer(batch=2, heads=3, hw=(6, 5), dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    q, k = (torch.randn(batch, heads, n, dim, generator=g) for _ in range(2))
    return LayerQK(q, k, dim ** -0.5, hw)


def naive_self_attention(layer):
    """Form the HW x HW head-mean matrix the fused path must never form (reference only)."""
    return torch.softmax(layer.q @ layer.k.transpose(-1, -2) * layer.scale, dim=-1).mean(1)


def test_propagate_equals_naive_matrix_product():
    layer = random_layer()
    x = torch.rand(2, 30, 4)
    s = naive_self_attention(layer)
    assert torch.allclose(propagate(layer, x), s @ x, atol=1e-5)
    assert torch.allclose(propagate(layer, propagate(layer, x)), s @ s @ x, atol=1e-5)


def test_selfcross_equals_naive_s_squared():
    layer = random_layer()
    maps = torch.rand(2, 3, 6, 5)
    s = naive_self_attention(layer)
    expected = (s @ s @ maps.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 3, 6, 5)
    assert torch.allclose(t2m.selfcross(layer, maps), expected, atol=1e-5)


def test_sar_equals_naive_class_vector_attention():
    layer = random_layer(batch=1)
    labels = torch.randint(0, 3, (1, 6, 5))
    labels[0, 0, 0], labels[0, 0, 1] = 0, 1        # classes 0 and 1 present; class 3 is empty
    masks = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    masks[:, 3] = 0
    q, k = layer.q[0], layer.k[0]                  # [H, N, d]
    expected = torch.zeros(4, 30)
    for h in range(q.shape[0]):
        present = [c for c in range(4) if masks[0, c].sum() > 0]
        vectors = torch.stack([k[h][masks[0, c].flatten() > 0].mean(0) for c in present])
        probs = torch.softmax(q[h] @ vectors.T * layer.scale, dim=-1)
        for j, c in enumerate(present):
            expected[c] += probs[:, j] / q.shape[0]
    got = stableseg.class_attention(layer, masks)[0].flatten(1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.all(got[3] == 0)


def test_box_mask_is_union_of_region_boxes_and_guards_empty_maps():
    m = np.zeros((10, 10), np.float32)
    m[1, 1:4] = 1.0        # region A: row 1, cols 1..3
    m[6:9, 7] = 0.5        # region B: rows 6..8, col 7
    box = t2m.box_mask(m, 0.2)
    assert box[1, 1:4].all() and box[6:9, 7].all() and box.sum() == 3 + 3
    assert t2m.box_mask(np.zeros((4, 4), np.float32), 0.2).sum() == 0
    assert torch.all(minmax(torch.ones(1, 1, 3, 3)) == 0), 'constant map: no 0/0'


def test_t2m_background_formula():
    layer = random_layer(batch=1, hw=(4, 4))

    class Capture:
        cross = {'c': torch.softmax(torch.randn(1, 16, 77), -1)}
        self_qk = {'s': layer}

        def layer_size(self, n):
            return (4, 4)
    out = t2m.scores(Capture(), [[1, 2], [3]], ['c'], ['s'], box_threshold=0.2, tau=0.35)
    assert out.shape == (3, 4, 4)
    assert torch.allclose(out[0], (0.7 - out[1:].max(0).values) ** 2, atol=1e-6)
