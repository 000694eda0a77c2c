"""`diffseg eval personal`: personalized referring segmentation on SynthMug (T2M section 5.3, Table 7).

A concept is learned (Custom Diffusion) for every personal mug from its training views, cached in
--concepts-dir. In each scene view every visible personal mug is a query; per method:
  ours           'red <newK> mug'  the concept in its context (concepts of the view merged in closed form)
  subject        '<newK> mug'      Subject Only
  context        'red mug'         Context Only: no concept, the base model
  arithmetic     'red <avgK>'      the class word's embedding averaged with the concept's, base K/V
  ours_separate  as ours with one forward per concept instead of the merged K/V (the merge check)
Every method assigns its queries to the same kind of segments (foreground of "mug", spectral clustering
of self-attention, Hungarian). Reported per split (all / semantic / visual distractors): mIoU, bf_acc,
af_acc; plus how far the merged forward is from one forward per concept. JSON + PNG.
"""
import argparse
import hashlib
from dataclasses import asdict, fields, replace
import json
import os
import sys
import tempfile

import numpy as np
from tqdm import tqdm

from ..core.concepts import ConceptError, ConceptLibrary, concept_folder, load_concept, save_concept
from ..core.instances import (InstanceQuery, PersonalConfig, PersonalSegmenter, score_query, summarise,
                              truth_instance)
from ..core.query_engine import instance_config
from ..core.sd_models import load_sd_components
from ..core.segmenter import Segmenter, SegmenterConfig
from ..synthworld.synthmug import distractors, make_benchmark
from ..training.custom_diffusion import ConceptTrainer, LearnSettings, next_free_token, training_size

METHODS = ('ours', 'subject', 'context', 'arithmetic', 'ours_separate')
SPLITS = ('all', 'semantic', 'visual')


def method_queries(method, mugs, concepts):
    """Build one method's queries for the personal mugs of a view (class word 'mug' for all)."""
    queries = []
    for mug in mugs:
        token = concepts[mug.key].token
        prompt = {'ours': f'{mug.colour} {token} mug', 'ours_separate': f'{mug.colour} {token} mug',
                  'subject': f'{token} mug', 'context': f'{mug.colour} mug',
                  'arithmetic': f'{mug.colour} {token}'}[method]
        queries.append(InstanceQuery(mug.name, prompt, 'mug', mug.name))
    return queries


def arithmetic_concepts(library, concepts):
    """Concepts whose embedding is the mean of the concept's and the class word's, without K/V."""
    return {key: replace(c, embedding=(c.embedding + library.word_embedding(c.class_word)) / 2, kv={})
            for key, c in concepts.items()}


def mug_digest(mug, views):
    """Identity of a personal mug and its training views (a cached concept must match it exactly)."""
    h = hashlib.sha1(repr(asdict(mug)).encode())
    for view in views:
        h.update(np.ascontiguousarray(view).tobytes())
    return h.hexdigest()[:16]


def learn_pool(library, bench, concepts_dir, settings, show_progress=True):
    """Learn a concept per personal mug, reusing those in concepts_dir learned on this model and settings.

    A cached concept is reused only when its training settings and the mug's identity and training views
    (digest) match, so draws of different seeds never share a concept by name.
    """
    trainer, concepts = None, {}
    for mug in tqdm(bench.mugs, desc='concepts', disable=not show_progress):
        views = bench.views[mug.key]
        wanted = dict(asdict(settings), images=len(views), size=training_size(library.sd, settings.size),
                      synthmug=mug_digest(mug, views))
        try:
            concept = load_concept(concept_folder(concepts_dir, mug.name), library.fingerprint)
            if all(concept.training.get(k) == v for k, v in wanted.items()):
                concepts[mug.key] = concept
                continue
        except ConceptError:
            pass
        trainer = trainer or ConceptTrainer.from_library(library)
        concept = trainer.learn(views, mug.name, 'mug', None, class_images=bench.class_images,
                                class_captions=bench.class_captions, settings=settings,
                                token=next_free_token(concepts_dir, mug.name), show_progress=show_progress)
        concept.training['synthmug'] = wanted['synthmug']
        save_concept(concept, concepts_dir)
        concepts[mug.key] = concept
    return concepts


def evaluate_view(personal, library, scene, bench, concepts, arithmetic, methods, installed):
    """Per-query rows of every method on one scene view, and each method's InstanceResult.

    `installed` remembers what the library holds, so methods sharing an install share the first pass.
    """
    by_key = {m.key: m for m in bench.mugs}
    mugs = [by_key[k] for k in scene.mugs]
    present = [concepts[m.key] for m in mugs]
    installs = {'ours': (present, True), 'subject': (present, True), 'ours_separate': (present, True),
                'arithmetic': ([arithmetic[m.key] for m in mugs], False), 'context': ([], True)}
    rows, results = [], {}
    for method in sorted(methods, key=list(installs).index):
        wanted, kv = installs[method]
        if installed.get('state') != ([id(c) for c in wanted], kv):
            library.install(wanted, kv_concepts=None if kv else [])
            installed['state'] = ([id(c) for c in wanted], kv)
        personal.config.kv_mode = 'separate' if method == 'ours_separate' else 'merged'
        queries = method_queries(method, mugs, arithmetic if method == 'arithmetic' else concepts)
        result = results[method] = personal.segment(scene.rgb, queries)
        for mug, query in zip(mugs, result.queries):
            row = score_query(result, query, scene.instances == scene.mugs[mug.key])
            rows.append(dict(row, method=method, mug=mug.key, scene=scene.seed, view=scene.view,
                             splits=['all'] + distractors(mug, scene, bench.mugs)))
    personal.config.kv_mode = 'merged'
    return rows, results


def merge_difference(merged, separate):
    """How far the merged forward is from one forward per concept: map L1 difference and assignments."""
    diffs, same_joint, same_alone = [], [], []
    for prompt, sep in separate.maps.items():
        if prompt in merged.maps and '<' in prompt:
            diffs.append(float(np.abs(merged.maps[prompt] - sep).sum() / max(np.abs(sep).sum(), 1e-12)))
    for a, b in zip(merged.queries, separate.queries):
        same_joint.append(a.instance_id == b.instance_id)
        same_alone.append(a.alone_instance_id == b.alone_instance_id)
    return dict(relative_l1=diffs, same_joint=same_joint, same_alone=same_alone)


def summarise_rows(rows, methods):
    """Summarise rows per method and split: {method: {split: summary}}."""
    return {m: {s: summarise([r for r in rows if r['method'] == m and s in r['splits']]) for s in SPLITS}
            for m in methods}


def run_personal_eval(model_path='', seed=0, mugs=8, scenes=12, views=1, size=128, train_views=(5, 10),
                      class_count=16, methods=METHODS, concepts_dir=None, settings=None, max_segments=6,
                      dtype='float32', report_png=None, show_progress=True, components=None, image_size=0):
    """Build SynthMug, learn the concepts, evaluate every method; returns the report dict.

    Scenes are rendered at `size`; the model learns concepts at settings.size (0 = the size it was trained
    at) and sees the scenes at `image_size` (0 = as the node's instance path does: their own size, within
    the training size and the model's default input size).
    """
    settings = settings or LearnSettings()
    sd = components or load_sd_components(model_path, dtype=dtype)
    bench = make_benchmark(seed, mugs, scenes, views, train_views, size, class_count)
    library = ConceptLibrary(sd)
    with tempfile.TemporaryDirectory() as scratch:
        concepts = learn_pool(library, bench, concepts_dir or scratch, settings, show_progress)
        arithmetic = arithmetic_concepts(library, concepts)
        config = SegmenterConfig(model_path=model_path, dtype=dtype, method='t2m', image_size=image_size,
                                 min_image_size=image_size)
        seg = Segmenter(instance_config(config, sd), components=sd)
        personal = PersonalSegmenter(seg, library, PersonalConfig(max_segments=max_segments))
        rows, merge, examples, installed = [], [], [], {}
        for scene in tqdm(bench.scenes, desc='scenes', disable=not show_progress):
            if not scene.mugs:
                continue
            view_rows, results = evaluate_view(personal, library, scene, bench, concepts, arithmetic,
                                               methods, installed)
            rows += view_rows
            if 'ours' in results and 'ours_separate' in results:
                merge.append(merge_difference(results['ours'], results['ours_separate']))
            if len(examples) < 4:
                examples.append((scene, results))
        library.uninstall()
    report = dict(model=sd.path, fingerprint=library.fingerprint, benchmark=bench.settings,
                  learn=asdict(settings), max_segments=max_segments,
                  queries=len(rows) // max(1, len(methods)),
                  methods=summarise_rows(rows, methods), merge_check=_merge_summary(merge), rows=rows,
                  concepts={k: dict(token=c.token, loss_first=c.training.get('loss_first'),
                                    loss_last=c.training.get('loss_last')) for k, c in concepts.items()})
    report['bars'] = _bars(report['methods'])
    if report_png:
        write_report_png(report, examples, bench, report_png)
    return report


def _merge_summary(merge):
    if not merge:
        return {}
    flat = {key: [v for m in merge for v in m[key]] for key in ('relative_l1', 'same_joint', 'same_alone')}
    return dict(views=len(merge), relative_l1_mean=float(np.mean(flat['relative_l1'] or [0])),
                relative_l1_max=float(np.max(flat['relative_l1'] or [0])),
                joint_agreement=float(np.mean(flat['same_joint'] or [1])),
                alone_agreement=float(np.mean(flat['same_alone'] or [1])))


def _bars(methods):
    """Issue 4's bars: ours af_acc >= 0.90 and above both uni-modal baselines on the all split."""
    if 'ours' not in methods:
        return {}
    ours = methods['ours']['all']['af_acc']
    others = [methods[m]['all']['af_acc'] for m in ('subject', 'context') if m in methods]
    return dict(ours_af_acc=ours, af_at_least_0_90=ours >= 0.9, above_unimodal=all(ours > o for o in others))


def write_report_png(report, examples, bench, path):
    """Bars of mIoU / bf_acc / af_acc per method and split, and example views with ours' assignment."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    methods = list(report['methods'])
    fig = plt.figure(figsize=(14, 4 + 3 * len(examples)))
    grid = fig.add_gridspec(1 + len(examples), 3)
    for c, split in enumerate(SPLITS):
        ax = fig.add_subplot(grid[0, c])
        x = np.arange(len(methods))
        for i, metric in enumerate(('miou', 'bf_acc', 'af_acc')):
            values = [report['methods'][m][split][metric] for m in methods]
            ax.bar(x + (i - 1) * 0.27, values, 0.27, label=metric)
        count = report['methods'][methods[0]][split]['count']
        ax.set_title(f'{split} ({count} queries)')
        ax.set_xticks(x, methods, rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    by_key = {m.key: m for m in bench.mugs}
    for r, (scene, results) in enumerate(examples):
        truth = np.zeros(scene.instances.shape, np.int32)
        for k, key in enumerate(scene.mugs):
            truth[scene.instances == scene.mugs[key]] = k + 1
        ours = results.get('ours') or next(iter(results.values()))
        panels = [('view', scene.rgb), ('personal mugs', truth), ('ours: instances', ours.instances)]
        for c, (title, image) in enumerate(panels):
            ax = fig.add_subplot(grid[r + 1, c])
            ax.imshow(image, cmap=None if image.ndim == 3 else 'tab10', interpolation='nearest')
            if c == 2:
                candidates = [s['instance_id'] for s in ours.segments]
                for k, q in enumerate(ours.queries):
                    mug = by_key[q.text.split()[-1]]
                    right = truth_instance(ours.instances, scene.instances == scene.mugs[mug.key], candidates)
                    ok = q.instance_id and q.instance_id == right
                    ax.text(0, 8 + 10 * k, f'{mug.key} {mug.colour} {mug.pattern}: #{q.instance_id}'
                            f'{" ok" if ok else ""}', fontsize=6, color='white', backgroundcolor='black')
            ax.set_title(title, fontsize=8)
            ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args):
    settings = LearnSettings(**{f.name: getattr(args, f'learn_{f.name}') for f in fields(LearnSettings)})
    report = run_personal_eval(args.model, args.seed, args.mugs, args.scenes, args.views, args.size,
                               tuple(args.train_views), args.class_count, tuple(args.methods),
                               args.concepts_dir, settings, args.max_segments, args.dtype, args.report,
                               image_size=args.image_size)
    for method, splits in report['methods'].items():
        print(f'{method:14s} ' + '  '.join(f"{s}: mIoU {v['miou']:.3f} bf {v['bf_acc']:.3f} "
                                           f"af {v['af_acc']:.3f} ({v['count']})" for s, v in splits.items()))
    if report['merge_check']:
        print('merged vs one forward per concept:', json.dumps(report['merge_check']))
    print('bars:', json.dumps(report['bars']))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return 0


def add_parser(subparsers, name='personal'):
    """Register the `personal` evaluation on a subparsers object (e.g. the sub-verbs of `diffseg eval`)."""
    p = subparsers.add_parser(name, help='personalized referring segmentation on SynthMug (T2M Table 7)')
    p.add_argument('--model', default='', help="diffusers folder ('' = embedded SynthWorld model)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--mugs', type=int, default=8, help='personal mugs in the pool')
    p.add_argument('--scenes', type=int, default=12)
    p.add_argument('--views', type=int, default=2, help='orbiting views rendered per scene')
    p.add_argument('--size', type=int, default=128, help='size the scenes are rendered at')
    p.add_argument('--image-size', type=int, default=0,
                   help="size the model sees them at (0 = the node's instance path: their own size, within "
                        "the model's training and default sizes)")
    p.add_argument('--train-views', type=int, nargs=2, default=[5, 10], help='views per mug: min max')
    p.add_argument('--class-count', type=int, default=16, help='regularisation images (other mugs)')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    p.add_argument('--concepts-dir', default=None, help='cache of learned concepts (reused when they fit)')
    p.add_argument('--max-segments', type=int, default=6)
    p.add_argument('--dtype', default='float32')
    p.add_argument('--json', default=None)
    p.add_argument('--report', default=None, help='PNG report path')
    for field_name, value in asdict(LearnSettings()).items():     # --learn-steps, --learn-lr, ...
        p.add_argument('--learn-' + field_name.replace('_', '-'), type=type(value), default=value)
    p.set_defaults(func=main)
    os.environ.setdefault('MPLBACKEND', 'Agg')
    return p


def cli(argv=None):
    """Standalone entry point: python -m diffseg_ros.tools.eval_personal [options]."""
    parser = argparse.ArgumentParser(prog='diffseg eval', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_parser(parser.add_subparsers(dest='what', required=True), 'personal')
    args = parser.parse_args(['personal', *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == '__main__':
    sys.exit(cli())
