"""The CUDA path's settings, checked on CPU (tiny seeded models, the SD-1.x layout included).

SDPA runs in every attention layer a frame does not capture; channels-last and torch.compile give the
segmentation the model gives without them.
"""
import functools

from diffusers.models.attention_processor import Attention, AttnProcessor2_0
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from diffseg_ros.core import attention
from diffseg_ros.core.sd_models import load_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from tiny_models import save_tiny_layout

QUERIES = ['red mug', 'blue bottle']
# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4 %) and channels-last changes the order in which the
# convolutions accumulate, so each layer's output may move by a rounding step, and the steps add up with
# depth. Measured on these models: q and k of a captured layer differ by 1.3 % of their largest value in the
# first block up to 5.5 % in the last, cross-attention maps by up to 6.7e-4, probabilities by up to 0.021.
# The bounds leave about 1.5x of that.
BF16_PROBABILITIES = 0.03
BF16_QK_RELATIVE = 0.08
BF16_CROSS = 1e-3


@pytest.fixture(scope='module')
def sd1_dir(tmp_path_factory):
    return save_tiny_layout('sd1', str(tmp_path_factory.mktemp('sd1')), seed=0)


@pytest.fixture(scope='module')
def models(tiny_model_dir, sd1_dir):
    return {'tiny': tiny_model_dir, 'sd1': sd1_dir}


def frame(h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run(model_dir, method, dtype='float32', **settings):
    """One frame through a fresh Segmenter on freshly loaded weights: (the frame's capture, its result)."""
    sd = load_sd_components(model_dir, dtype=dtype)
    seg = Segmenter(SegmenterConfig(method=method, dtype=dtype, image_size=64, **settings), components=sd)
    seg.set_queries(QUERIES)
    return seg.attend(frame()).capture, seg.segment(frame())


def test_every_attention_layer_runs_sdpa_unless_captured_and_gets_it_back(tiny_model_dir, monkeypatch):
    sd = load_sd_components(tiny_model_dir)
    layers = [m for model in (sd.unet, sd.vae) for m in model.modules() if isinstance(m, Attention)]
    assert layers and all(type(m.processor) is AttnProcessor2_0 for m in layers)
    ran = {}
    for kind in (AttnProcessor2_0, attention.CaptureProcessor):
        monkeypatch.setattr(kind, '__call__', recording(kind.__call__, kind.__name__, ran))
    # the whole forward: a truncated one stops before the last blocks, which then run no processor at all
    seg = Segmenter(SegmenterConfig(method='t2m', image_size=64, truncate_forward=False), components=sd)
    seg.segment(frame(), QUERIES)
    modules = dict(sd.unet.named_modules())
    captured = {id(modules[name].transformer_blocks[0].attn2) for name in seg.settings.cross_layers}
    captured |= {id(modules[name].transformer_blocks[0].attn1) for name in seg.settings.self_layers}
    assert ran['CaptureProcessor'] == captured
    decoder = {id(m) for m in sd.vae.decoder.modules()}             # never runs for segmentation
    assert ran['AttnProcessor2_0'] == {id(m) for m in layers} - captured - decoder
    assert all(type(m.processor) is AttnProcessor2_0 for m in layers)


def recording(call, kind, ran):
    """Wrap a processor's __call__ to note which attention module it ran for."""
    @functools.wraps(call)          # diffusers reads the processor's signature to pass it keywords
    def wrapped(self, attn, *args, **kwargs):
        ran.setdefault(kind, set()).add(id(attn))
        return call(self, attn, *args, **kwargs)
    return wrapped


@pytest.mark.parametrize('model', ['tiny', 'sd1'])
@pytest.mark.parametrize('method', ['cross', 'stableseg', 't2m'])
def test_channels_last_gives_the_same_segmentation_in_float32(models, model, method):
    (plain_capture, plain), (nhwc_capture, nhwc) = run(models[model], method), \
        run(models[model], method, channels_last=True)
    same_capture(plain_capture, nhwc_capture, cross=1e-5, qk_relative=1e-5)
    if method == 't2m':
        # T2M boxes each query at a fraction of its maximum, a step: a cell at the edge may fall on the other
        # side for a 1e-6 change (measured: 1.8e-3 in probability, 0.16 % of the labels).
        assert np.abs(plain.probabilities - nhwc.probabilities).max() <= 5e-3
        assert (plain.labels != nhwc.labels).mean() <= 0.01
    else:
        assert np.abs(plain.probabilities - nhwc.probabilities).max() <= 1e-5
        assert np.array_equal(plain.labels, nhwc.labels)


@pytest.mark.parametrize('model', ['tiny', 'sd1'])
@pytest.mark.parametrize('method', ['cross', 'stableseg'])
def test_channels_last_gives_the_same_segmentation_in_bfloat16(models, model, method):
    (plain_capture, plain), (nhwc_capture, nhwc) = run(models[model], method, 'bfloat16'), \
        run(models[model], method, 'bfloat16', channels_last=True)
    same_capture(plain_capture, nhwc_capture, cross=BF16_CROSS, qk_relative=BF16_QK_RELATIVE)
    assert np.abs(plain.probabilities - nhwc.probabilities).max() <= BF16_PROBABILITIES
    # a label may change only where two scores were within the tolerance of each other
    scores = np.concatenate([np.full((1, *plain.labels.shape), 0.4), plain.probabilities])
    top_two = np.sort(scores, axis=0)[-2:]
    changed = plain.labels != nhwc.labels
    assert (top_two[1] - top_two[0])[changed].max(initial=0) <= 2 * BF16_PROBABILITIES


def test_channels_last_in_bfloat16_keeps_t2m_attention(sd1_dir):
    """Compare T2M's capture in bf16: that is what channels-last could change.

    Its boxes and (2 tau - max)^2 background turn bf16 rounding into label changes of their own.
    """
    plain, _ = run(sd1_dir, 't2m', 'bfloat16')
    nhwc, _ = run(sd1_dir, 't2m', 'bfloat16', channels_last=True)
    same_capture(plain, nhwc, cross=BF16_CROSS, qk_relative=BF16_QK_RELATIVE)


def test_channels_last_reaches_the_weights(tiny_model_dir):
    sd = load_sd_components(tiny_model_dir)
    Segmenter(SegmenterConfig(method='cross', image_size=64, channels_last=True), components=sd)
    for model in (sd.unet, sd.vae):
        assert first_conv(model).weight.is_contiguous(memory_format=torch.channels_last)


def first_conv(model):
    """Return the first 3x3 convolution of a model (a 1x1 kernel's layout is the same either way)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))


def test_compiled_unet_captures_what_the_eager_one_does(tiny_model_dir, monkeypatch):
    """Compile the UNet (capture processors traced inside, swapped every frame) and the VAE encoder.

    Inductor's code generation takes minutes here (220 s for a two-level UNet on this 2-core machine), so
    the test compiles with dynamo's eager backend: what could break the capture (graph capture of the
    processors installed per frame, guards on them, their writes to the capture, forward hooks) is the
    same; inductor's kernels were compared by hand (docs/GPU.md). (AOTAutograd's eager backend fails on
    the VAE encoder's group norm here, "Expected X.is_contiguous"; inductor runs it.)
    """
    eager_sd = load_sd_components(tiny_model_dir)
    eager = Segmenter(SegmenterConfig(method='t2m', image_size=64), components=eager_sd)
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    torch._dynamo.reset()
    counters.clear()
    compiled_sd = load_sd_components(tiny_model_dir)
    compiled = Segmenter(SegmenterConfig(method='t2m', image_size=64, compile=True), components=compiled_sd)
    try:
        for seg in (eager, compiled):
            seg.set_queries(QUERIES)
        graphs = []
        for _ in range(2):          # the second frame swaps in new capture processors: no stale capture
            same_capture(eager.attend(frame()).capture, compiled.attend(frame()).capture)
            graphs.append(counters['stats']['unique_graphs'])
        other = dict(cross_layers=eager.settings.cross_layers[:1], self_layers=(),
                     feature_layers=('up_blocks.1',))
        for _ in range(2):
            a, b = eager.attend(frame(), **other), compiled.attend(frame(), **other)
            same_capture(a.capture, b.capture)
            graphs.append(counters['stats']['unique_graphs'])
        assert torch.allclose(a.features['up_blocks.1'], b.features['up_blocks.1'], atol=1e-5)
        assert compiled_sd.unet._compiled_call_impl and compiled_sd.vae.encoder._compiled_call_impl
        plain, fast = eager.segment(frame()), compiled.segment(frame())
        assert np.abs(plain.probabilities - fast.probabilities).max() <= 1e-5
        assert np.array_equal(plain.labels, fast.labels)
        # compiled once per captured-layer set, never per frame: the truncated forward's stop hooks split
        # the UNet into a few graphs, traced at the set's first frame and reused after
        assert graphs[0] == graphs[1] < graphs[2] == graphs[3] == counters['stats']['unique_graphs']
    finally:
        torch._dynamo.reset()


def same_capture(a, b, cross=1e-6, qk_relative=1e-5):
    """Assert two captures hold the same layers and maps.

    Cross-attention within `cross`; self-attention queries and keys within `qk_relative` of their largest
    magnitude.
    """
    assert list(a.cross) == list(b.cross) and list(a.self_qk) == list(b.self_qk)
    for name in a.cross:
        assert (a.cross[name] - b.cross[name]).abs().max() <= cross, name
    for name in a.self_qk:
        for x, y in ((a.self_qk[name].q, b.self_qk[name].q), (a.self_qk[name].k, b.self_qk[name].k)):
            assert (x.float() - y.float()).abs().max() <= qk_relative * x.float().abs().max(), name


def test_ldmseg_engine_applies_the_same_settings(tmp_path):
    """The label-completion node shares ModelConfig: channels-last reaches its UNet and VAE, same ids."""
    from diffseg_ros.ldmseg.engine import LDMSegEngine, LDMSegEngineConfig
    from tiny_models import tiny_random_ldmseg
    folder = tiny_random_ldmseg(seed=0).save(str(tmp_path / 'ldmseg'))
    image = frame(32, 32)
    labels = np.zeros((32, 32), np.int64)
    labels[4:12, 4:12], labels[20:28, 18:30] = 1, 2
    ids = []
    for channels_last in (False, True):
        engine = LDMSegEngine(LDMSegEngineConfig(model_path=folder, channels_last=channels_last, steps=2))
        assert first_conv(engine.model.unet).weight.is_contiguous(memory_format=torch.channels_last) \
            == channels_last
        ids.append(engine.model.complete(image, labels, steps=2, samples=1, resample=1))
    assert np.array_equal(ids[0], ids[1])
