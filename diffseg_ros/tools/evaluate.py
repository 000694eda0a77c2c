"""`diffseg eval`: segmentation accuracy of each method on held-out SynthWorld scenes.

A query is the caption phrase of one visible object ("red mug"); its IoU compares the query's mask with
that object's instance truth. Reported: mIoU over all queries, per-category IoU, the composed-prompt
setting (all of a scene's objects in one prompt, one forward) and one query at a time, plus sweeps of
timestep and layer choice on a subset. JSON + a PNG report (examples and bar charts). The model sees the
scenes at its own default input size (diffseg_defaults.json) unless --image-size says otherwise; the
truth stays at the rendered size.
"""
from dataclasses import replace
import json
import os

import numpy as np
from tqdm import tqdm

from ..core.attention import has_self_attention, transformer_blocks
from ..core.masks import iou
from ..core.sd_models import load_sd_components
from ..core.segmenter import Segmenter, SegmenterConfig
from ..synthworld import generate_scene
from . import eval_ldmseg, eval_personal

EVAL_SEED = 1_000_000_000      # held-out scenes start here; training uses seeds below 10^9
# Each method alone and refined by the dense CRF both papers use (T2M's optional dCRF, part of StableSeg++).
METHODS = ('cross', 'stableseg', 't2m', 'cross+crf', 'stableseg+crf', 't2m+crf')


def method_config(base, name):
    """Return the config of an evaluated method name: 'stableseg', or 'stableseg+crf' (CRF-refined)."""
    method, plus, post = name.partition('+')
    if plus and post != 'crf':
        raise ValueError(f"unknown refinement {post!r} in {name!r}: the only one is '+crf'")
    return replace(base, method=method, crf=bool(plus))


def held_out_scenes(seed, count, size):
    return [generate_scene(seed + i, width=size, height=size) for i in range(count)]


def score_scene(seg, scene, mode):
    """Score each visible object's phrase by IoU; mode 'composed' (one prompt) or 'single'."""
    phrases = [o.phrase for o in scene.objects]
    if mode == 'composed':
        result = seg.segment(scene.rgb, phrases)
        masks = dict(zip(result.queries, result.masks))
    else:
        masks = {p: seg.segment(scene.rgb, [p]).masks[0] for p in phrases}
    return [dict(query=o.phrase, category=o.category,
                 iou=iou(masks.get(o.phrase, False), scene.instances == o.instance_id))
            for o in scene.objects]


def summarise(rows):
    categories = sorted({r['category'] for r in rows})
    return dict(miou=float(np.mean([r['iou'] for r in rows])) if rows else 0.0, queries=len(rows),
                per_category={c: float(np.mean([r['iou'] for r in rows if r['category'] == c]))
                              for c in categories})


def evaluate_method(sd, config, scenes, mode='composed', desc=''):
    return evaluate_segmenter(Segmenter(config, components=sd), scenes, mode, desc)


def evaluate_segmenter(seg, scenes, mode='composed', desc=''):
    rows = [row for scene in tqdm(scenes, desc=desc, leave=False) for row in score_scene(seg, scene, mode)]
    return summarise(rows), rows


def sweeps(sd, base, scenes):
    """Measure mIoU vs model input size and timestep (t2m, stableseg), single cross / self layer (cross, t2m).

    Input sizes are 1, 1.5, 2 and 2.5 times the size the model was trained at (frames are upscaled).
    """
    out = {'image_size': {}, 'timestep': {}, 'cross_layer': {}, 't2m_self_layer': {}}
    sizes = [int(sd.native_image_size * f) for f in (1, 1.5, 2, 2.5)]
    for method in ('t2m', 'stableseg'):
        out['image_size'][method] = {
            s: evaluate_method(sd, replace(base, method=method, image_size=s), scenes,
                               desc=f'{method} {s} px')[0]['miou'] for s in sizes}
    for method in ('t2m', 'stableseg'):
        out['timestep'][method] = {t: evaluate_method(sd, replace(base, method=method, timestep=t), scenes,
                                                      desc=f'{method} t={t}')[0]['miou']
                                   for t in (1, 50, 150, 300, 500)}
    blocks = transformer_blocks(sd.unet)
    for i, (name, level) in enumerate(blocks):
        key = f'{i}:{name}@L{level}'
        cross_only = replace(base, method='cross', cross_layers=(i,))
        out['cross_layer'][key] = evaluate_method(sd, cross_only, scenes, desc=f'cross {key}')[0]['miou']
        if has_self_attention(sd.unet, name):
            t2m_self = replace(base, method='t2m', self_layers=(i,))
            out['t2m_self_layer'][key] = evaluate_method(sd, t2m_self, scenes,
                                                         desc=f't2m self {key}')[0]['miou']
    return out


def run_eval(model_path='', seed=EVAL_SEED, count=100, methods=METHODS, size=128,
             single_scenes=None, sweep_scenes=0, report_png=None, dtype='float32', image_size=0):
    """Evaluate on scenes rendered at `size`, seen by the model at `image_size` (0 = the model's default)."""
    sd = load_sd_components(model_path, dtype=dtype)
    scenes = held_out_scenes(seed, count, size)
    base = SegmenterConfig(model_path=model_path, dtype=dtype, image_size=image_size)
    report = dict(model=sd.path, seed=seed, scenes=count, size=size, methods={})
    for method in methods:
        seg = Segmenter(method_config(base, method), components=sd)
        report.setdefault('settings', {})[method] = settings_of(seg)
        composed, rows = evaluate_segmenter(seg, scenes, 'composed', desc=f'{method} composed')
        entry = dict(miou=composed['miou'], composed=composed, composed_rows=rows)
        if single_scenes != 0:
            entry['single'] = evaluate_segmenter(seg, scenes[:single_scenes], 'single',
                                                 desc=f'{method} single')[0]
        report['methods'][method] = entry
    if sweep_scenes:
        report['sweeps'] = sweeps(sd, base, scenes[:sweep_scenes])
    report['best'] = max(report['methods'], key=lambda m: report['methods'][m]['miou'])
    if report_png:
        write_report_png(report, sd, base, scenes[:4], report_png)
    return report


def settings_of(seg):
    """Return the settings a segmenter resolved (model input size, timestep, layers), for the report."""
    s = seg.settings
    return dict(image_size=s.image_size, timestep=s.timestep, cross_layers=list(s.cross_layers),
                self_layers=list(s.self_layers))


def write_report_png(report, sd, base, scenes, path):
    """Draw example grids (image / truth / labels per method) and bar charts of mIoU and category IoU."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    methods = list(report['methods'])
    fig = plt.figure(figsize=(3 * (2 + len(methods)), 3 * (len(scenes) + 2)))
    grid = fig.add_gridspec(len(scenes) + 2, 2 + len(methods))
    segmenters = {m: Segmenter(method_config(base, m), components=sd) for m in methods}
    for r, scene in enumerate(scenes):
        phrases = [o.phrase for o in scene.objects]
        truth = np.zeros(scene.instances.shape, np.int32)
        for k, o in enumerate(scene.objects):
            truth[scene.instances == o.instance_id] = k + 1
        panels = [('image', scene.rgb), ('truth', truth)]
        panels += [(m, segmenters[m].segment(scene.rgb, phrases).labels) for m in methods]
        for c, (title, image) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(image, cmap=None if image.ndim == 3 else 'tab10', vmin=0, vmax=9,
                      interpolation='nearest')
            ax.set_title(title if r else f'{title}\n' + ', '.join(phrases)[:60], fontsize=8)
            ax.axis('off')
    ax = fig.add_subplot(grid[len(scenes), :])
    x = np.arange(len(methods))
    ax.bar(x - 0.2, [report['methods'][m]['miou'] for m in methods], 0.4, label='composed prompt')
    if all('single' in report['methods'][m] for m in methods):
        ax.bar(x + 0.2, [report['methods'][m]['single']['miou'] for m in methods], 0.4,
               label='one query at a time')
    ax.set_xticks(x, methods)
    ax.set_ylabel('mIoU')
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color='grey', lw=0.5, ls='--')
    ax.legend()
    ax = fig.add_subplot(grid[len(scenes) + 1, :])
    cats = sorted(report['methods'][methods[0]]['composed']['per_category'])
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [report['methods'][m]['composed']['per_category'].get(c, 0) for c in cats]
        ax.bar(np.arange(len(cats)) + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(cats)), cats, fontsize=8)
    ax.set_ylabel('IoU per category')
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args):
    single = 0 if args.no_single else args.single_scenes
    report = run_eval(args.model, args.seed, args.scenes, tuple(args.methods), args.size, single,
                      args.sweep_scenes, args.report, args.dtype, args.image_size)
    for m, entry in report['methods'].items():
        single = (f"  single {entry['single']['miou']:.3f} ({entry['single']['queries']} queries)"
                  if 'single' in entry else '')
        print(f"{m:10s} mIoU composed {entry['miou']:.3f}{single}  ({entry['composed']['queries']} queries)")
    print(f"best: {report['best']}")
    if args.json:
        slim = json.loads(json.dumps(report))
        for entry in slim['methods'].values():
            entry.pop('composed_rows')
        with open(args.json, 'w') as f:
            json.dump(slim, f, indent=1)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser('eval', help='accuracy of each method on held-out SynthWorld scenes')
    p.add_argument('--model', default='', help="diffusers folder ('' = embedded SynthWorld model)")
    p.add_argument('--seed', type=int, default=EVAL_SEED, help='first held-out scene seed')
    p.add_argument('--scenes', type=int, default=100)
    p.add_argument('--size', type=int, default=128, help='size the scenes are rendered at')
    p.add_argument('--image-size', type=int, default=0,
                   help="size the model sees them at (0 = the model's default, diffseg_defaults.json)")
    p.add_argument('--methods', nargs='+', default=list(METHODS),
                   help="method names, '+crf' for the dense-CRF refined one (e.g. stableseg+crf)")
    p.add_argument('--no-single', action='store_true', help='skip the one-query-at-a-time setting')
    p.add_argument('--single-scenes', type=int, default=None,
                   help='one-query-at-a-time on the first N scenes only (default: all)')
    p.add_argument('--sweep-scenes', type=int, default=0,
                   help='run timestep/layer sweeps on this many scenes')
    p.add_argument('--dtype', default='float32')
    p.add_argument('--json', default=None)
    p.add_argument('--report', default=None, help='PNG report path')
    p.set_defaults(func=main)
    suites = p.add_subparsers(dest='suite', required=False, metavar='SUITE',
                              help='other benchmarks: ldmseg (label completion), personal (SynthMug)')
    eval_ldmseg.add_parser(suites)
    eval_personal.add_parser(suites)
    os.environ.setdefault('MPLBACKEND', 'Agg')
