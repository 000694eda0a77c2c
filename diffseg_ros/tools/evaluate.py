"""`diffseg eval`: segmentation accuracy of each method on held-out SynthWorld scenes.

A query is the caption phrase of one visible object ("red mug"); its IoU compares the query's mask with
that object's instance truth. Reported: mIoU over all queries, per-category IoU, the composed-prompt
setting (all of a scene's objects in one prompt, one forward) and one query at a time, plus sweeps of
timestep and layer choice on a subset. One query at a time also reports seen / unseen categories and
held-out colour-pattern combinations separately (synthworld/splits.py) and asks for two objects that are not
in the scene (absent-object false positives). 'stableseg' is the paper's (uniform layer weights),
'stableseg++' the model's learned weights, 'iosd' the model's learned head. JSON + a PNG report (examples
and bar charts). The model sees the
scenes at its own default input size (diffseg_defaults.json) unless --image-size says otherwise; the
truth stays at the rendered size.
"""
from dataclasses import replace
import json
import os
import statistics
import time

import numpy as np
from tqdm import tqdm

from ..core.attention import has_self_attention, transformer_blocks
from ..core.masks import iou
from ..core.sd_models import load_sd_components
from ..core.segmenter import Segmenter, SegmenterConfig
from ..synthworld import generate_scene
from ..synthworld.captions import phrase as make_phrase
from ..synthworld.splits import UNSEEN_CATEGORIES, all_phrases, object_split
from . import eval_ldmseg, eval_personal

EVAL_SEED = 1_000_000_000      # held-out scenes start here; training uses seeds below 10^9
# Each method alone and refined by the dense CRF both papers use (T2M's optional dCRF, part of StableSeg++).
METHODS = ('cross', 'stableseg', 't2m', 'cross+crf', 'stableseg+crf', 't2m+crf')
ABSENT_AREA = 0.01             # an absent object's mask above this share of the image is a false positive


def method_config(base, name, heads=None):
    """Return the config of an evaluated method name: 'stableseg', or 'stableseg+crf' (CRF-refined).

    'stableseg' is the paper's (uniform layer weights), 'stableseg++' uses the model's learned weights;
    names in `heads` ({name: head folder}) are the iosd method with that head.
    """
    crf = name.endswith('+crf')
    method = name[:-4] if crf else name
    if '+' in method.replace('stableseg++', ''):
        post = method.split('+')[-1]
        raise ValueError(f"unknown refinement {post!r} in {name!r}: the only one is '+crf'")
    if heads and method in heads:
        return replace(base, method='iosd', crf=crf, head_path=heads[method])
    if method == 'stableseg++':
        return replace(base, method='stableseg', crf=crf, layer_weights=True)
    if method == 'stableseg':
        return replace(base, method=method, crf=crf, layer_weights=False)
    return replace(base, method=method, crf=crf)


def held_out_scenes(seed, count, size):
    return [generate_scene(seed + i, width=size, height=size) for i in range(count)]


def absent_queries(scene):
    """Return two phrases of objects not in the scene's world (a seen and an unseen category).

    Drawn from the scene's seed (splits.py): what a planner may ask for that is not there.
    """
    rng = np.random.default_rng([scene.seed, 21])
    present = {(o.colour, o.category) for o in (scene.spec.objects if scene.spec else scene.objects)}
    out = []
    for unseen in (False, True):
        pool = [p for p in all_phrases() if p not in present and (p[1] in UNSEEN_CATEGORIES) == unseen]
        colour, category = pool[rng.integers(len(pool))]
        out.append(make_phrase(colour, category))
    return out


def score_scene(seg, scene, mode, absent=False):
    """Score each visible object's phrase by IoU; mode 'composed' (one prompt) or 'single'.

    Rows carry the object's split (seen / unseen category / held-out colour-pattern combination). With
    `absent` (single mode) the scene's absent_queries() are asked too: rows with present=False and the
    share of the image their mask covers.
    """
    phrases = [o.phrase for o in scene.objects]
    if mode == 'composed':
        result = seg.segment(scene.rgb, phrases)
        masks = dict(zip(result.queries, result.masks))
    else:
        masks = {p: seg.segment(scene.rgb, [p]).masks[0] for p in phrases}
    rows = [dict(query=o.phrase, category=o.category, split=object_split(o.category, o.colour, o.pattern),
                 present=True, iou=iou(masks.get(o.phrase, False), scene.instances == o.instance_id))
            for o in scene.objects]
    if absent and mode == 'single':
        for p in absent_queries(scene):
            mask = seg.segment(scene.rgb, [p]).masks[0]
            category = p.split(' ', 1)[1]
            rows.append(dict(query=p, category=category, split=object_split(category), present=False,
                             area=float(mask.mean())))
    return rows


def summarise(rows):
    """Summarise rows: mIoU of present objects, per category and split; absent-object false positives."""
    absent = [r for r in rows if r.get('present') is False]
    rows = [r for r in rows if r.get('present', True)]
    categories = sorted({r['category'] for r in rows})
    out = dict(miou=float(np.mean([r['iou'] for r in rows])) if rows else 0.0, queries=len(rows),
               per_category={c: float(np.mean([r['iou'] for r in rows if r['category'] == c]))
                             for c in categories})
    if any('split' in r for r in rows):
        for split in ('seen', 'unseen', 'combo'):
            vals = [r['iou'] for r in rows if r.get('split') == split]
            out[f'miou_{split}'] = float(np.mean(vals)) if vals else None
            out[f'queries_{split}'] = len(vals)
    if absent:
        out['absent_queries'] = len(absent)
        out['absent_fp_rate'] = float(np.mean([r['area'] > ABSENT_AREA for r in absent]))
        for split in ('seen', 'unseen'):
            sel = [r['area'] > ABSENT_AREA for r in absent if r['split'] == split]
            out[f'absent_fp_rate_{split}'] = float(np.mean(sel)) if sel else None
    return out


def evaluate_method(sd, config, scenes, mode='composed', desc=''):
    return evaluate_segmenter(Segmenter(config, components=sd), scenes, mode, desc)


def evaluate_segmenter(seg, scenes, mode='composed', desc='', absent=False):
    rows = [row for scene in tqdm(scenes, desc=desc, leave=False)
            for row in score_scene(seg, scene, mode, absent)]
    return summarise(rows), rows


def frame_costs(segmenters, scenes, repeats=3):
    """Median seconds of one frame, one query (VAE encode + UNet + method), round-robin over methods."""
    samples = {name: [] for name in segmenters}
    for seg in segmenters.values():
        seg.segment(scenes[0].rgb, [scenes[0].objects[0].phrase])          # warm-up
    for r in range(repeats):
        for scene in scenes:
            for name, seg in segmenters.items():
                start = time.perf_counter()
                seg.segment(scene.rgb, [scene.objects[0].phrase])
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


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
             single_scenes=None, sweep_scenes=0, report_png=None, dtype='float32', image_size=0,
             heads=None, single_methods=None, cost_scenes=0):
    """Evaluate on scenes rendered at `size`, seen by the model at `image_size` (0 = the model's default).

    heads: {row name: head folder} for iosd rows with other heads; single_methods: the methods also run one
    query at a time (None = all), with absent-object queries; cost_scenes: frames timed per method.
    """
    sd = load_sd_components(model_path, dtype=dtype)
    scenes = held_out_scenes(seed, count, size)
    base = SegmenterConfig(model_path=model_path, dtype=dtype, image_size=image_size)
    report = dict(model=sd.path, seed=seed, scenes=count, size=size, methods={})
    for method in methods:
        seg = Segmenter(method_config(base, method, heads), components=sd)
        report.setdefault('settings', {})[method] = settings_of(seg)
        composed, rows = evaluate_segmenter(seg, scenes, 'composed', desc=f'{method} composed')
        entry = dict(miou=composed['miou'], composed=composed, composed_rows=rows)
        if single_scenes != 0 and (single_methods is None or method in single_methods):
            entry['single'] = evaluate_segmenter(seg, scenes[:single_scenes], 'single',
                                                 desc=f'{method} single', absent=True)[0]
        report['methods'][method] = entry
    if cost_scenes:
        fresh = {m: Segmenter(method_config(base, m, heads), components=sd) for m in methods}
        costs = frame_costs(fresh, scenes[:cost_scenes])
        for m, seconds in costs.items():
            report['methods'][m]['frame_seconds'] = seconds
            if 'cross' in costs:
                report['methods'][m]['frame_cost_vs_cross'] = seconds / costs['cross']
    if sweep_scenes:
        report['sweeps'] = sweeps(sd, base, scenes[:sweep_scenes])
    report['best'] = max(report['methods'], key=lambda m: report['methods'][m]['miou'])
    if report_png:
        write_report_png(report, sd, base, scenes[:4], report_png, heads)
    return report


def settings_of(seg):
    """Return the settings a segmenter resolved (model input size, timestep, layers, head), for the report."""
    s = seg.settings
    return dict(image_size=s.image_size, timestep=s.timestep, cross_layers=list(s.cross_layers),
                self_layers=list(s.self_layers), head=seg.describe().get('head'),
                layer_weights=s.layer_weights)


def write_report_png(report, sd, base, scenes, path, heads=None):
    """Draw example grids (image / truth / labels per method) and bar charts of mIoU and category IoU.

    With single-query results also seen / unseen mIoU and the absent-object false-positive rate.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    methods = list(report['methods'])
    splits = any('miou_seen' in e.get('single', {}) for e in report['methods'].values())
    extra = 1 if splits else 0
    fig = plt.figure(figsize=(3 * (2 + len(methods)), 3 * (len(scenes) + 2 + extra)))
    grid = fig.add_gridspec(len(scenes) + 2 + extra, 2 + len(methods))
    segmenters = {m: Segmenter(method_config(base, m, heads), components=sd) for m in methods}
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
    if splits:
        ax = fig.add_subplot(grid[len(scenes) + 2, :])
        single = [m for m in methods if 'single' in report['methods'][m]]
        x = np.arange(len(single))
        for i, (key, label) in enumerate((('miou_seen', 'seen categories'), ('miou_unseen',
                                                                             'unseen categories'),
                                          ('absent_fp_rate', 'absent objects: false-positive rate'))):
            ax.bar(x + (i - 1) * 0.27, [report['methods'][m]['single'].get(key) or 0 for m in single], 0.27,
                   label=label)
        ax.set_xticks(x, single)
        ax.set_ylim(0, 1)
        ax.set_title('one query at a time')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt(value):
    return '  -  ' if value is None else f'{value:.3f}'


def main(args):
    single = 0 if args.no_single else args.single_scenes
    heads = dict(h.split('=', 1) for h in args.heads)
    report = run_eval(args.model, args.seed, args.scenes, tuple(args.methods), args.size, single,
                      args.sweep_scenes, args.report, args.dtype, args.image_size, heads,
                      args.single_methods, args.cost_scenes)
    for m, entry in report['methods'].items():
        c = entry['composed']
        line = (f"{m:14s} composed {entry['miou']:.3f} (seen {_fmt(c.get('miou_seen'))} unseen "
                f"{_fmt(c.get('miou_unseen'))}, {c['queries']} queries)")
        if 'single' in entry:
            s = entry['single']
            line += (f"  single {s['miou']:.3f} (seen {_fmt(s.get('miou_seen'))} "
                     f"unseen {_fmt(s.get('miou_unseen'))}"
                     f" combo {_fmt(s.get('miou_combo'))}, {s['queries']} queries) absent FP "
                     f"{_fmt(s.get('absent_fp_rate'))}")
        if 'frame_seconds' in entry:
            ratio = _fmt(entry.get('frame_cost_vs_cross'))
            line += f"  frame {entry['frame_seconds']:.2f} s ({ratio} x cross)"
        print(line)
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
    p.add_argument('--heads', nargs='*', default=[], metavar='NAME=DIR',
                   help='extra iosd rows: method NAME uses the head folder DIR (iosd-pseudo=runs/h/export)')
    p.add_argument('--single-methods', nargs='*', default=None,
                   help='run only these methods one query at a time (default: all)')
    p.add_argument('--cost-scenes', type=int, default=0,
                   help='time one frame per method on this many scenes (round-robin)')
    p.add_argument('--dtype', default='float32')
    p.add_argument('--json', default=None)
    p.add_argument('--report', default=None, help='PNG report path')
    p.set_defaults(func=main)
    suites = p.add_subparsers(dest='suite', required=False, metavar='SUITE',
                              help='other benchmarks: ldmseg (label completion), personal (SynthMug)')
    eval_ldmseg.add_parser(suites)
    eval_personal.add_parser(suites)
    os.environ.setdefault('MPLBACKEND', 'Agg')
