"""`diffseg bench`: cost of the segmentation pipeline relative to a bare VAE encode + UNet forward.

Everything is measured in one run on the same model (SD 1.5 architecture with random weights by
default), so the ratios hold even though absolute timings swing between machines and runs.
Peak memory is the process's peak resident set during a call (weights included), sampled by a thread;
the growth above the idle process is reported too.
"""
import json
import os
import statistics
import threading
import time

import numpy as np
import torch

from ..core.attention import transformer_blocks
from ..core.sd_models import build_sd_components, load_sd_components, sd15_configs
from ..core.segmenter import Segmenter, SegmenterConfig

QUERIES = ['red mug', 'blue bottle', 'green ball', 'yellow box', 'white bowl', 'black can', 'brown book',
           'plant pot']


def rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakMemory:
    """Context manager sampling RSS every millisecond; `.peak` is the growth above the entry value."""

    def __enter__(self):
        self.base = self.peak_rss = rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak_rss = max(self.peak_rss, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        self.peak = self.peak_rss - self.base


def measure(runs, repeats):
    """Time each named callable round-robin (so load changes hit all alike) after one warm-up call each.

    Returns {name: dict(seconds=median, peak_mb=max peak RSS, growth_mb=max growth above idle)}.
    """
    for fn in runs.values():
        fn()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            with PeakMemory() as mem:
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
            samples[name].append((seconds, mem.peak_rss / 2 ** 20, mem.peak / 2 ** 20))
    return {name: dict(seconds=statistics.median(s[0] for s in rows), peak_mb=max(s[1] for s in rows),
                       growth_mb=max(s[2] for s in rows)) for name, rows in samples.items()}


def last_block_read(seg):
    """Return '<index>/<count> <module>' of the last transformer block the method reads (forward order)."""
    names = [name for name, _ in transformer_blocks(seg.sd.unet)]
    read = set(seg.settings.cross_layers) | set(seg.settings.self_layers)
    last = max(names.index(name) for name in read)
    return f'{last}/{len(names)} {names[last]}'


def captured_bytes(capture):
    """Bytes the capture holds for the method: cross maps and self-attention q/k."""
    tensors = list(capture.cross.values()) + [t for qk in capture.self_qk.values() for t in (qk.q, qk.k)]
    return sum(t.numel() * t.element_size() for t in tensors)


def segment_with(seg, rgb, queries, unet_seconds=None):
    """One frame for a query set; the set's text embedding is cached after the warm-up call.

    unet_seconds: a list collecting the UNet part of each frame (the method's forward, truncated or not).
    """
    def run():
        seg.set_queries(queries)
        result = seg.segment(rgb)
        if unet_seconds is not None:
            unet_seconds.append(result.timings['unet'])
    return run


def bare_parts(seg, rgb):
    """Return the floor any method pays and its parts: VAE encode, full UNet forward (stock processors)."""
    seg.set_queries(QUERIES[:1])
    text, t = seg.prompt.embeddings, torch.tensor([seg.settings.timestep])

    def encode():
        with torch.inference_mode():
            pixels, _ = seg.images.preprocess(rgb, seg.input_size(max(rgb.shape[:2])))
            return seg.encode(pixels.to(seg.sd.device, seg.sd.dtype))
    latent = encode()

    def unet(latent=latent):
        with torch.inference_mode():
            seg.sd.unet(latent, t, encoder_hidden_states=text, return_dict=False)
    return {'bare': lambda: unet(encode()), 'vae_encode': encode, 'full_unet': unet}


def run_bench(size=256, repeats=3, methods=('cross', 'stableseg', 't2m'), model_path=None, dtype='float32',
              head_path='', channels_last=False):
    """Measure bare vs pipeline for 1, 4 and 8 queries per method; return a JSON-able dict.

    channels_last: UNet and VAE in NHWC (the GPU path's setting; the bare forward runs on the same weights).
    """
    torch.manual_seed(0)
    sd = (load_sd_components(model_path, dtype=dtype) if model_path
          else build_sd_components(sd15_configs(), seed=0, dtype=dtype))
    rgb = np.random.default_rng(0).integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8)
    report = dict(model=model_path or 'SD 1.5 architecture, random weights', size=size, dtype=dtype,
                  channels_last=channels_last, threads=torch.get_num_threads(), methods={})
    for method in methods:
        seg = Segmenter(SegmenterConfig(method=method, image_size=size, dtype=dtype, head_path=head_path,
                                        channels_last=channels_last), components=sd)
        runs, unet_seconds = bare_parts(seg, rgb), []
        for n in (1, 4, 8):
            runs[n] = segment_with(seg, rgb, QUERIES[:n], unet_seconds if n == 1 else None)
        rows = measure(runs, repeats)
        bare, vae, full_unet = rows.pop('bare'), rows.pop('vae_encode'), rows.pop('full_unet')
        peak = max(r['peak_mb'] for r in rows.values())
        seg.set_queries(QUERIES[:8])
        method_unet = statistics.median(unet_seconds[1:])     # [0] is the warm-up call
        report['methods'][method] = dict(
            bare=bare, vae_encode=vae, full_unet=full_unet, method_unet_seconds=method_unet,
            unet_over_full_unet=method_unet / full_unet['seconds'],
            vae_encode_over_bare=vae['seconds'] / bare['seconds'],
            last_block_read=last_block_read(seg),
            queries=rows, pipeline_over_bare=rows[1]['seconds'] / bare['seconds'],
            q8_over_q1=rows[8]['seconds'] / rows[1]['seconds'],
            memory_overhead=(peak - bare['peak_mb']) / bare['peak_mb'],
            growth_over_bare_mb=max(r['growth_mb'] for r in rows.values()) - bare['growth_mb'],
            captured_mb=captured_bytes(seg.attend(rgb).capture) / 2 ** 20)
    if 'cross' in report['methods']:
        for m in report['methods'].values():
            cross = report['methods']['cross']['queries'][1]['seconds']
            m['q1_over_cross_q1'] = m['queries'][1]['seconds'] / cross
    return report


def run_instance_bench(model_path='', size=(256, 192), repeats=5, dtype='float32', seed=1):
    """Cost of the fused instance path (issue 18) vs the plain semantic path on the same frames, one run.

    Frames: SynthMug scene views rendered at `size` (w, h); the semantic path is the model's recommended
    method (its defaults: input size, CRF), asked for 'mug'; the instance path asks for 'mug' and three
    context queries, without concepts (one forward either way; concept K/V only change weights).
    """
    from ..core.instances import InstanceQuery
    from ..core.personal_fused import FusedPersonalSegmenter
    from ..synthworld.synthmug import build_scene, make_pool
    sd = load_sd_components(model_path or '', dtype=dtype)
    pool = make_pool(4, seed)
    scene = build_scene(pool, 10_000 * (seed + 1), size=max(size), views=1)[0]
    rgb = np.ascontiguousarray(scene.rgb[:size[1], :size[0]])
    semantic = Segmenter(SegmenterConfig(model_path=model_path or '', dtype=dtype), components=sd)
    fused = FusedPersonalSegmenter(Segmenter(SegmenterConfig(model_path=model_path or '', dtype=dtype,
                                                             method='t2m'), components=sd, instances=True))
    queries = [InstanceQuery(f'q{i}', f'{m.colour} mug', 'mug', '') for i, m in enumerate(pool[:3])]
    runs = {'semantic': segment_with(semantic, rgb, ['mug']),
            'instance': lambda: fused.segment(rgb, queries)}
    rows = measure(runs, repeats)
    return dict(model=sd.path, frame=list(size), dtype=dtype, threads=torch.get_num_threads(), paths=rows,
                instance_over_semantic=rows['instance']['seconds'] / rows['semantic']['seconds'])


def parse_frame(text):
    """Parse 'WxH' (e.g. 640x480) into (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise ValueError(f'frame sizes are WxH, e.g. 640x480; got {text!r}') from None
    return width, height


def run_frames_bench(model_path='', frames=((640, 480), (4000, 3000)), repeats=3, dtype='float32', seed=0):
    """Cost of a frame by its size on the node's two paths, one run (issue 19: bounded work per frame).

    One SynthWorld scene resized to each frame size goes through the semantic path (the model's
    recommended method, CRF included) and the fused instance path; everything heavy runs at the model's
    input size, so large_frame_ratio (seconds of the largest frame / the smallest, worst path) stays
    near 1 (target <= 2).
    """
    from ..core.instances import InstanceQuery
    from ..core.personal_fused import FusedPersonalSegmenter
    from ..synthworld import generate_scene
    import cv2
    sd = load_sd_components(model_path or '', dtype=dtype)
    semantic = Segmenter(SegmenterConfig(model_path=model_path or '', dtype=dtype), components=sd)
    fused = FusedPersonalSegmenter(Segmenter(SegmenterConfig(model_path=model_path or '', dtype=dtype,
                                                             method='t2m'), components=sd, instances=True))
    scene = generate_scene(seed, size=256)
    queries = [InstanceQuery(text, text, text.split()[-1], '') for text in ('red mug', 'bottle')]
    runs = {}
    for width, height in frames:
        rgb = cv2.resize(scene.rgb, (width, height), interpolation=cv2.INTER_LINEAR)
        runs[f'semantic {width}x{height}'] = segment_with(semantic, rgb, ['red mug', 'bottle'])
        runs[f'instance {width}x{height}'] = (lambda rgb=rgb: fused.segment(rgb, queries))
    rows = measure(runs, repeats)
    small, large = (f'{w}x{h}' for w, h in (min(frames, key=lambda f: f[0] * f[1]),
                                            max(frames, key=lambda f: f[0] * f[1])))
    ratios = {path: rows[f'{path} {large}']['seconds'] / rows[f'{path} {small}']['seconds']
              for path in ('semantic', 'instance')}
    return dict(model=sd.path, input_size=semantic.settings.image_size, dtype=dtype,
                threads=torch.get_num_threads(), frames=rows, ratios=ratios,
                large_frame_ratio=max(ratios.values()))


def print_report(report):
    print(f"model: {report['model']}  input: {report['size']} px  dtype: {report['dtype']}  "
          f"channels-last: {report['channels_last']}  threads: {report['threads']}")
    print(f"{'method':10s} {'bare s':>8s} {'1q s':>8s} {'4q s':>8s} {'8q s':>8s} {'pipe/bare':>10s} "
          f"{'8q/1q':>7s} {'bare MB':>8s} {'peak MB':>8s} {'mem +%':>7s} {'capt MB':>8s}")
    for name, m in report['methods'].items():
        q = m['queries']
        print(f"{name:10s} {m['bare']['seconds']:8.3f} {q[1]['seconds']:8.3f} {q[4]['seconds']:8.3f} "
              f"{q[8]['seconds']:8.3f} {m['pipeline_over_bare']:10.3f} {m['q8_over_q1']:7.3f} "
              f"{m['bare']['peak_mb']:8.0f} {max(r['peak_mb'] for r in q.values()):8.0f} "
              f"{100 * m['memory_overhead']:7.1f} {m['captured_mb']:8.1f}")
    print('targets: pipeline/bare <= 1.15, 8q/1q <= 1.10, memory overhead <= 10 %; at 512 px (--large): '
          'unet/full cross <= 0.65, t2m <= 0.75, pipeline/bare cross <= 0.85, t2m <= 0.90')
    print(f"{'method':10s} {'VAE s':>8s} {'UNet s':>8s} {'its UNet s':>10s} {'unet/full':>10s} "
          f"{'VAE/bare':>9s}  last block read")
    for name, m in report['methods'].items():
        print(f"{name:10s} {m['vae_encode']['seconds']:8.3f} {m['full_unet']['seconds']:8.3f} "
              f"{m['method_unet_seconds']:10.3f} {m['unet_over_full_unet']:10.3f} "
              f"{m['vae_encode_over_bare']:9.3f}  {m['last_block_read']}")
    for name, m in report['methods'].items():
        if 'q1_over_cross_q1' in m:
            print(f"{name:10s} one-query frame / cross-only's: {m['q1_over_cross_q1']:.3f}")


def main(args):
    if args.cameras:
        from .bench_cameras import print_report as print_cameras, run_cameras_bench
        report = run_cameras_bench(args.cameras, args.model or '', args.size or 0, args.cameras_method,
                                   tuple(args.frame_size), args.repeats)
        print_cameras(report)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1)
        return 0
    if args.frames:
        report = run_frames_bench(args.model or '', [parse_frame(f) for f in args.frames], args.repeats,
                                  args.dtype)
        print(json.dumps(report, indent=1))
        print(f"large_frame_ratio {report['large_frame_ratio']:.2f} (target <= 2)")
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1)
        return 0
    if args.instances:
        report = run_instance_bench(args.model or '', tuple(args.frame), args.repeats, args.dtype)
        print(json.dumps(report, indent=1))
        print('target: instance path / semantic path <= 1.3')
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1)
        return 0
    report = run_bench(size=512 if args.large else args.size or 256, repeats=args.repeats,
                       methods=args.methods, model_path=args.model, dtype=args.dtype,
                       head_path=args.head_path, channels_last=args.channels_last)
    print_report(report)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser('bench', help='pipeline vs bare UNet cost, query scaling and peak memory')
    p.add_argument('--size', type=int, default=None,
                   help='input long side in px (default 256; --cameras: the model default)')
    p.add_argument('--large', action='store_true', help='use 512 px input')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--methods', nargs='+', default=['cross', 'stableseg', 't2m'])
    p.add_argument('--model', default=None, help='a local diffusers folder instead of random SD 1.5 weights')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--head-path', default='', help="iosd: head folder ('' = the model's own)")
    p.add_argument('--channels-last', action='store_true', help='UNet and VAE in channels-last memory format')
    p.add_argument('--json', default=None, help='write machine-readable results here')
    p.add_argument('--instances', action='store_true',
                   help='fused instance path vs plain semantic path on a SynthMug frame')
    p.add_argument('--frame', type=int, nargs=2, default=[256, 192], help='--instances frame size: w h')
    p.add_argument('--frames', nargs='+', default=None, metavar='WxH',
                   help='cost by frame size on the embedded (or --model) model, e.g. '
                        '--frames 640x480 4000x3000; reports large_frame_ratio')
    p.add_argument('--cameras', type=int, nargs='+', default=None, metavar='N',
                   help='N cameras in one node (batched) vs N one-camera nodes, each configuration in '
                        'processes of its own (peak RSS), e.g. --cameras 1 2 4')
    p.add_argument('--cameras-method', default='', help="--cameras: the method ('' = the model's choice)")
    p.add_argument('--frame-size', type=int, nargs=2, default=[320, 240], help='--cameras frame size: w h')
    p.set_defaults(func=main)
