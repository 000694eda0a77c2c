"""StableSeg: cross-attention probability maps (CAPM) refined by Self-Attention Refinement (SAR).

CAPM averages the cross-attention of the coarse (<= 16 at 512 px) layers of one UNet pass on the clean
latent at t=1. SAR turns argmax(CAPM) into class masks, averages each layer's self-attention keys inside
each mask into a class vector, and attends from every query position to those class vectors (SAPM).
The result is CAPM + SAPM. A multi-token query name is merged into one token by summing its features.
"""
import torch
import torch.nn.functional as F

from .common import finest_size, minmax, query_cross_maps, resize

PROMPT_PREFIX = 'a photo of'
DEFAULT_TIMESTEP = 1


def merge_query_tokens(embeddings, spans):
    """Replace each query's token features [1, T, D] by their sum at one position; keep the length T."""
    starts = {span[0]: span for span in spans}
    inside = {i for span in spans for i in span}
    rows, new_spans = [], []
    for pos in range(embeddings.shape[1]):
        if pos in starts:
            new_spans.append([len(rows)])
            rows.append(embeddings[:, starts[pos]].sum(dim=1))
        elif pos not in inside:
            rows.append(embeddings[:, pos])
    rows += [embeddings[:, -1]] * (embeddings.shape[1] - len(rows))     # pad with the last (padding) feature
    return torch.stack(rows, dim=1), new_spans


def class_attention(layer, masks):
    """SAPM of one layer: softmax over classes of q . (mean key inside each class mask), head mean.

    masks [B, C, h, w] (0/1, at the layer's size) -> [B, C, h, w]. An empty class gets no probability.
    """
    m = masks.flatten(2).to(layer.k.dtype)                       # [B, C, HW]
    counts = m.sum(-1)                                           # [B, C]
    class_keys = torch.einsum('bcn,bhnd->bhcd', m, layer.k) / counts.clamp_min(1)[:, None, :, None]
    logits = (layer.q @ class_keys.transpose(-1, -2)).float() * layer.scale   # [B, H, HW, C]
    logits = logits.masked_fill((counts == 0)[:, None, None, :], float('-inf'))
    probs = torch.nan_to_num(F.softmax(logits, dim=-1)).mean(1)             # [B, HW, C]
    return probs.transpose(1, 2).reshape(masks.shape).float()


def scores(capture, spans, cross_layers, self_layers, background_threshold, layer_weights=None, **_):
    """Return the mean of CAPM and SAPM as [K+1, h, w] scores; channel 0 is the background.

    `layer_weights` ({layer: w}, StableSeg++'s learned weights of the cross-attention layers) replaces the
    uniform mean over the layers of CAPM.
    """
    size = finest_size(capture, cross_layers, 'cross')
    capm = minmax(query_cross_maps(capture, cross_layers, spans, size, layer_weights))
    capm = torch.cat([torch.full_like(capm[:, :1], background_threshold), capm], dim=1)   # [B, K+1, h, w]
    if not self_layers:
        return capm.mean(0)
    size = finest_size(capture, self_layers, 'self')
    capm = resize(capm, size)
    class_masks = F.one_hot(capm.argmax(1), capm.shape[1]).permute(0, 3, 1, 2).float()
    sapm = 0
    for name in self_layers:
        layer = capture.self_qk[name]
        layer_masks = resize(class_masks, layer.size, mode='nearest')
        sapm = sapm + resize(class_attention(layer, layer_masks), size)
    return ((capm + sapm / len(self_layers)) / 2).mean(0)
