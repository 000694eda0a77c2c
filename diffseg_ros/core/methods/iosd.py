"""IOSD: a learned segmentation head over the frame's single UNet forward.

A visual encoder per resolution and a text-query fusion transformer read the features and cross-attention of
the one forward (core/heads/iosd.py; IOSD §3.1). The segmenter loads the head from `head_path` ('' = the
model folder's own `heads/iosd/`) and refuses one trained on another base model. Each query's probability is
sigmoid(mask) x sigmoid(presence); the head's calibrated constant background competes in the argmax, so an
absent object gets no pixels.
"""
import torch

from ..heads import iosd as heads     # module import: heads.iosd itself uses methods.common

PROMPT_PREFIX = 'a photo of'
DEFAULT_TIMESTEP = 100
NEEDS_HEAD = True


def scores(capture, spans, head, features, embeddings, **_):
    """Return [K+1, h, w] scores at the head's finest level; channel 0 is the background.

    `features` holds the forward's block outputs, `embeddings` [1, T, D] the prompt's text features.
    """
    feats, text, prior = heads.head_inputs(head.config, features, capture.cross, spans, embeddings[:1],
                                           capture.layer_size)
    with torch.inference_mode():
        logits, presence = head([f[:1] for f in feats], text, prior)
        probs = head.probabilities(logits, presence)[0]
    return torch.cat([torch.full_like(probs[:1], head.config.background), probs])
