"""`diffseg eval personal`: personalized referring segmentation on SynthMug (T2M section 5.3, Table 7).

A concept is learned (Custom Diffusion) for every personal mug from its training views, cached in
--concepts-dir, with its appearance prototypes (core/appearance.py) stored beside it. In each scene view
every visible personal mug is a query. Rows:
  ours        fused: one forward with 'red <newK> mug' (concepts of the view merged in closed form);
              class-agnostic proposals; subject + context + appearance + class evidences, calibrated weights
  t2m         today's attention-only method (PersonalSegmenter: foreground of "mug", spectral clustering of
              self-attention, SelfCross maps of 'red <newK>', Hungarian; two forwards)
  appearance  prototype similarity only (the DINO-ViT row of T2M Table 7): forward with 'mug', base model
  subject     Subject Only: '<newK> mug', its token's attention
  context     Context Only: 'red mug' on the base model, its colour word's attention
  arithmetic  'red <avgK>': the class word's embedding averaged with the concept's, base K/V
Every row but t2m uses the same proposal method on its own forward, and ranks proposals with its class word
("class" evidence); each row's evidence weights are fitted on validation draws (--calibration JSON from
`--fit-calibration` on other seeds), never on the draw reported. Per split (all / semantic / visual
distractors): mIoU, bf_acc, af_acc with bootstrap 95 % intervals over scenes; proposal recall (share of
personal mugs matched by some proposal at IoU >= 0.5); cost per frame beside the plain semantic path's
measured in the same process. JSON + PNG (with failure cases).
"""
import argparse
import hashlib
from dataclasses import asdict, replace
import json
import os
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from ..core.appearance import PROTOTYPE_SCALES, AppearanceError, load_prototypes, save_prototypes
from ..core.concept_learning import ConceptTrainer, LearnSettings, training_size
from ..core.concepts import ConceptError, ConceptLibrary, concept_folder, load_concept, next_free_token, \
    save_concept
from ..core.fusion import FEATURES, assign, fit_weights, fuse, standardise_all
from ..core.images import resize_labels
from ..core.instances import InstanceQuery, PersonalConfig, PersonalSegmenter, score_query
from ..core.personal_fused import FusedConfig, FusedPersonalSegmenter, extract_prototypes
from ..core.sd_models import load_sd_components
from ..core.segmenter import Segmenter, SegmenterConfig
from ..core.settings import add_arguments, from_arguments
from ..synthworld.synthmug import distractors, make_benchmark

SPLITS = ('all', 'semantic', 'visual')


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


ROWS = ('ours', 't2m', 'appearance', 'subject', 'context', 'arithmetic')
ROW_EVIDENCES = {'ours': ('subject', 'context', 'appearance', 'class'), 'appearance': ('appearance', 'class'),
                 'subject': ('subject', 'class'), 'context': ('context', 'class'),
                 'arithmetic': ('subject', 'context', 'class')}


def row_queries(row, mugs, concepts):
    """One row's queries for the personal mugs of a view (class word 'mug' for all)."""
    queries = []
    for mug in mugs:
        token = concepts[mug.key].token
        prompt = {'ours': f'{mug.colour} {token} mug', 't2m': f'{mug.colour} {token} mug',
                  'subject': f'{token} mug', 'context': f'{mug.colour} mug', 'appearance': 'mug',
                  'arithmetic': f'{mug.colour} {token}'}[row]
        queries.append(InstanceQuery(mug.name, prompt, 'mug', mug.name))
    return queries


def prototypes_for(fused, bench, concepts, masks_mode='model', show_progress=True):
    """Appearance prototypes of every pool mug, stored in (and reused from) its concept folder."""
    out = {}
    for mug in tqdm(bench.mugs, desc='prototypes', disable=not show_progress):
        concept = concepts[mug.key]
        found = None
        if concept.folder:
            try:
                found = load_prototypes(concept.folder, fused.seg.sd.fingerprint(),
                                        fused.config.feature_layers)
            except AppearanceError:
                found = None
        if found is not None and found.timestep == fused.seg.settings.timestep and \
                found.info.get('masks') == masks_mode and found.info.get('scales') == list(PROTOTYPE_SCALES):
            out[mug.name] = found
            continue
        masks = bench.view_masks[mug.key] if masks_mode == 'given' else None
        found = extract_prototypes(fused, bench.views[mug.key], 'mug', masks)
        if found is not None and concept.folder:
            save_prototypes(found, concept.folder)
        out[mug.name] = found
    return {k: v for k, v in out.items() if v is not None}


def install_for(library, row, present, arithmetic, state):
    """Install what a row needs (kept across rows and views when unchanged)."""
    wanted = {'ours': (present, True), 't2m': (present, True), 'subject': (present, True),
              'arithmetic': ([arithmetic[c.name] for c in present], False), 'context': ([], True),
              'appearance': ([], True)}[row]
    key = ([id(c) for c in wanted[0]], wanted[1])
    if state.get('installed') != key:
        library.install(wanted[0], kv_concepts=None if wanted[1] else [])
        state['installed'] = key


def view_record(row, result, scene, mugs, cost):
    """Record what a row's forward gave on a view, enough to score it with any weights later (JSON)."""
    labels = resize_labels(result.proposals.labels, scene.instances.shape)   # proposals: at input size
    truths = [scene.instances == scene.mugs[m.key] for m in mugs]
    count = int(labels.max())
    ious = [[_iou(labels == c + 1, t) for c in range(count)] for t in truths]
    raw = result.scores.get('mug', {}).get('raw', {})
    return dict(row=row, scene=int(scene.seed), view=int(scene.view), mugs=[m.key for m in mugs],
                proposals=count, ious=ious, raw={k: v for k, v in raw.items()}, seconds=cost,
                timings={k: round(float(v), 4) for k, v in result.timings.items()})


def t2m_record(result, scene, mugs, queries, cost):
    """Record the t2m row's per-query outcome (its own segments; T2M's protocol)."""
    rows = []
    for mug, query in zip(mugs, result.queries):
        rows.append(score_query(result, query, scene.instances == scene.mugs[mug.key]))
    truths = [scene.instances == scene.mugs[m.key] for m in mugs]
    ids = [s['instance_id'] for s in result.segments if s['class_word'] == 'mug']
    best = [max([_iou(result.instances == i, t) for i in ids], default=0.0) for t in truths]
    return dict(row='t2m', scene=int(scene.seed), view=int(scene.view), mugs=[m.key for m in mugs],
                fixed=rows, best_ious=best, seconds=cost)


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def score_record(record, weights, min_score=-np.inf):
    """Per-query outcome of a recorded view under evidence weights: iou, bf, af, reachable, recall."""
    if 'fixed' in record:
        return [dict(r, recall=bool(b >= 0.5)) for r, b in zip(record['fixed'], record['best_ious'])]
    ious = np.asarray(record['ious'], float).reshape(len(record['mugs']), record['proposals'])
    raw = {k: np.asarray(v, float).reshape(ious.shape) for k, v in record['raw'].items()}
    z = standardise_all(raw)
    fused = fuse(z, weights) if z and ious.shape[1] else None
    if fused is None:
        fused = np.zeros(ious.shape)
    alone, joint = assign(fused, min_score)
    out = []
    for q in range(len(ious)):
        right = int(np.argmax(ious[q])) if ious.shape[1] and ious[q].max() > 0 else -1
        out.append(dict(iou=float(ious[q, joint[q]]) if joint[q] >= 0 else 0.0,
                        bf=bool(right >= 0 and alone[q] == right), af=bool(right >= 0 and joint[q] == right),
                        reachable=bool(right >= 0), recall=bool(ious.shape[1] and ious[q].max() >= 0.5)))
    return out


def calibration_samples(records, evidences):
    """(z-scores, right proposal) per recorded view for fitting weights (right: best IoU >= 0.5)."""
    samples = []
    for record in records:
        ious = np.asarray(record['ious'], float).reshape(len(record['mugs']), record['proposals'])
        if not ious.size:
            continue
        raw = {k: np.asarray(v, float).reshape(ious.shape)
               for k, v in record['raw'].items() if k in evidences}
        right = [int(np.argmax(r)) if r.max() >= 0.5 else -1 for r in ious]
        samples.append((standardise_all(raw), right))
    return samples


def fit_row_weights(records, l2=0.01):
    """Weights per row (its evidences only) fitted on recorded validation views."""
    weights = {}
    for row, evidences in ROW_EVIDENCES.items():
        mine = [r for r in records if r['row'] == row]
        if mine:
            fixed = {e: 0.0 for e in FEATURES if e.rstrip('~') not in evidences}
            weights[row] = fit_weights(calibration_samples(mine, evidences), FEATURES, l2=l2, fixed=fixed)
    return weights


def query_rows(records, weights, bench):
    """Flat per-query rows of every recorded view under the rows' weights (with split membership)."""
    by_key = {m.key: m for m in bench.mugs}
    scenes = {(s.seed, s.view): s for s in bench.scenes}
    rows = []
    for record in records:
        scene = scenes[(record['scene'], record['view'])]
        outcome = score_record(record, weights.get(record['row'], {}))
        for key, result in zip(record['mugs'], outcome):
            rows.append(dict(result, row=record['row'], mug=key, scene=record['scene'], view=record['view'],
                             splits=['all'] + distractors(by_key[key], scene, bench.mugs)))
    return rows


def bootstrap(rows, metric, reps=1000, seed=0):
    """Mean of a per-query metric and its 95 % interval, resampling scenes (with their views)."""
    if not rows:
        return dict(value=0.0, low=0.0, high=0.0, count=0)
    scenes = sorted({r['scene'] for r in rows})
    per = {s: [float(r[metric]) for r in rows if r['scene'] == s] for s in scenes}
    sums = np.array([sum(per[s]) for s in scenes])
    counts = np.array([len(per[s]) for s in scenes])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scenes), (reps, len(scenes)))
    values = sums[picks].sum(1) / np.maximum(counts[picks].sum(1), 1)
    value = float(sums.sum() / counts.sum())
    low, high = np.percentile(values, [2.5, 97.5])
    return dict(value=value, low=float(low), high=float(high), count=int(counts.sum()))


def summarise_rows(rows, rows_present):
    """{row: {split: {metric: bootstrap dict}}} for mIoU, bf_acc, af_acc and proposal recall."""
    metrics = {'miou': 'iou', 'bf_acc': 'bf', 'af_acc': 'af', 'proposal_recall': 'recall'}
    out = {}
    for row in rows_present:
        out[row] = {}
        for split in SPLITS:
            mine = [r for r in rows if r['row'] == row and split in r['splits']]
            out[row][split] = {name: bootstrap(mine, key) for name, key in metrics.items()}
    return out


def run_personal_eval(model_path='', seed=0, mugs=12, scenes=36, views=2, size=128, train_views=(5, 10),
                      class_count=16, rows=ROWS, concepts_dir=None, settings=None, dtype='float32',
                      report_png=None, show_progress=True, components=None, image_size=0, calibration=None,
                      timestep=-1, masks_mode='model', semantic_cost=True, max_segments=6, fused_config=None):
    """Build SynthMug, learn concepts and prototypes, run every row on every view; returns the report dict.

    calibration: {row: {evidence: weight}} (from --fit-calibration on validation seeds); None = weights
    fitted on this draw itself, reported as such (only for validation draws). Scenes are rendered at
    `size`; the model sees them at `image_size` (0 = as the node's instance path does: their own size within
    the training size and the model's default input size).
    """
    settings = settings or LearnSettings()
    sd = components or load_sd_components(model_path, dtype=dtype)
    bench = make_benchmark(seed, mugs, scenes, views, train_views, size, class_count)
    library = ConceptLibrary(sd)
    records, examples = [], {}
    base = SegmenterConfig(model_path=model_path, dtype=dtype, method='t2m', image_size=image_size,
                           min_image_size=image_size or sd.native_image_size)
    fused_seg = Segmenter(replace(base, timestep=timestep), components=sd, instances=True)
    fused = FusedPersonalSegmenter(fused_seg, library, fused_config or FusedConfig())
    semantic = Segmenter(SegmenterConfig(model_path=model_path, dtype=dtype), components=sd) \
        if semantic_cost else None
    with tempfile.TemporaryDirectory() as scratch:
        concepts = learn_pool(library, bench, concepts_dir or scratch, settings, show_progress)
        library.install([])
        fused.prototypes = prototypes_for(fused, bench, concepts, masks_mode, show_progress)
        arithmetic = arithmetic_concepts(library, {c.name: c for c in concepts.values()})
        t2m = PersonalSegmenter(Segmenter(base, components=sd), library,   # today's T2M path
                                PersonalConfig(max_segments=max_segments)) if 't2m' in rows else None
        state = {}
        by_key = {m.key: m for m in bench.mugs}
        for scene in tqdm(bench.scenes, desc='views', disable=not show_progress):
            if not scene.mugs:
                continue
            present_mugs = [by_key[k] for k in scene.mugs]
            present = [concepts[m.key] for m in present_mugs]
            for row in sorted(rows, key=list(ROWS).index):
                install_for(library, row, present, arithmetic, state)
                keyed = {m.key: arithmetic[concepts[m.key].name] if row == 'arithmetic' else concepts[m.key]
                         for m in present_mugs}
                queries = row_queries(row, present_mugs, keyed)
                start = time.perf_counter()
                if row == 't2m':
                    result = t2m.segment(scene.rgb, queries)
                    records.append(t2m_record(result, scene, present_mugs, queries,
                                              time.perf_counter() - start))
                    continue
                result = fused.segment(scene.rgb, queries, evidences=ROW_EVIDENCES[row])
                records.append(view_record(row, result, scene, present_mugs, time.perf_counter() - start))
                if row == 'ours':
                    examples[(scene.seed, scene.view)] = (scene, result)
            if semantic is not None:
                semantic.set_queries(['mug'])
                start = time.perf_counter()
                semantic.segment(scene.rgb)
                records.append(dict(row='semantic_path', scene=int(scene.seed), view=int(scene.view),
                                    seconds=time.perf_counter() - start))
        library.uninstall()
    scored = [r for r in records if r['row'] in rows]
    if calibration is None:
        weights = fit_row_weights([r for r in scored if 'raw' in r])
        source = f'fitted on this draw (seed {seed}): a validation number, not a test number'
    else:
        weights = {k: dict(v) for k, v in calibration['weights'].items()}
        source = calibration.get('source', '')
    per_query = query_rows(scored, weights, bench)
    cost = {row: float(np.median([r['seconds'] for r in records if r['row'] == row]))
            for row in list(rows) + (['semantic_path'] if semantic is not None else [])}
    report = dict(model=sd.path, fingerprint=library.fingerprint, benchmark=bench.settings,
                  learn=asdict(settings), timestep=int(fused_seg.settings.timestep),
                  prototypes_masks=masks_mode,
                  proposals=asdict(fused.config.proposals),
                  queries=sum(1 for r in per_query if r['row'] == rows[0]),
                  splits={s: sum(1 for r in per_query if r['row'] == rows[0] and s in r['splits'])
                          for s in SPLITS},
                  weights=weights, calibration_source=source, rows=summarise_rows(per_query, rows),
                  cost_seconds=cost,
                  cost_ratio_instance_over_semantic=(cost['ours'] / cost['semantic_path']
                                                     if 'ours' in cost and 'semantic_path' in cost else None),
                  per_query=per_query, records=[r for r in records if r['row'] != 'semantic_path'],
                  concepts={k: dict(token=c.token, loss_first=c.training.get('loss_first'),
                                    loss_last=c.training.get('loss_last')) for k, c in concepts.items()})
    report['bars'] = _bars(report)
    if report_png:
        write_report_png(report, examples, bench, report_png)
    return report


def _bars(report):
    """Issue 18's bars on this draw."""
    rows = report['rows']
    if 'ours' not in rows:
        return {}
    ours = rows['ours']
    singles = [r for r in ('appearance', 'subject', 'context') if r in rows]
    best = max(singles, key=lambda r: rows[r]['all']['af_acc']['value']) if singles else None
    half = (ours['all']['af_acc']['high'] - ours['all']['af_acc']['low']) / 2
    af = ours['all']['af_acc']['value']
    out = dict(af_acc=af, af_acc_at_least_0_90=af >= 0.9,
               visual_af_acc_at_least_0_80=ours['visual']['af_acc']['value'] >= 0.8,
               miou_at_least_0_60=ours['all']['miou']['value'] >= 0.6,
               proposal_recall_at_least_0_85=ours['all']['proposal_recall']['value'] >= 0.85)
    if best:
        out['best_single'] = best
        out['above_best_single_by_half_width'] = \
            ours['all']['af_acc']['value'] - rows[best]['all']['af_acc']['value'] > half
        out['at_or_above_every_single_on_every_split'] = all(
            ours[s]['af_acc']['value'] >= rows[r][s]['af_acc']['value'] for s in SPLITS for r in singles)
    if report.get('cost_ratio_instance_over_semantic') is not None:
        out['cost_ratio_at_most_1_3'] = report['cost_ratio_instance_over_semantic'] <= 1.3
    return out


def write_report_png(report, examples, bench, path):
    """Bars with 95 % intervals per row and split, proposal recall and cost, and failure cases of ours."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = list(report['rows'])
    failures = _failures(report, examples)[:6]
    fig = plt.figure(figsize=(15, 4.5 + 2.6 * ((len(failures) + 1) // 2)))
    grid = fig.add_gridspec(1 + (len(failures) + 1) // 2, 8)
    for c, split in enumerate(SPLITS):
        ax = fig.add_subplot(grid[0, 2 * c:2 * c + 2])
        x = np.arange(len(rows))
        for i, metric in enumerate(('miou', 'bf_acc', 'af_acc')):
            vals = [report['rows'][r][split][metric] for r in rows]
            ax.bar(x + (i - 1) * 0.27, [v['value'] for v in vals], 0.27, label=metric,
                   yerr=[[v['value'] - v['low'] for v in vals], [v['high'] - v['value'] for v in vals]],
                   capsize=2)
        ax.set_title(f"{split} ({report['splits'][split]} queries)", fontsize=9)
        ax.set_xticks(x, rows, rotation=25, fontsize=7)
        ax.set_ylim(0, 1)
        ax.axhline(0.9 if split == 'all' else (0.8 if split == 'visual' else 0), color='k', lw=0.5, ls=':')
        if c == 0:
            ax.legend(fontsize=6)
    ax = fig.add_subplot(grid[0, 6:8])
    ax.axis('off')
    lines = ['proposal recall (IoU >= 0.5), all:']
    for r in rows:
        v = report['rows'][r]['all']['proposal_recall']
        lines.append(f"  {r:10s} {v['value']:.3f} [{v['low']:.3f}, {v['high']:.3f}]")
    lines.append('cost per frame (median s):')
    for r, v in report['cost_seconds'].items():
        lines.append(f'  {r:13s} {v:.3f}')
    ratio = report.get('cost_ratio_instance_over_semantic')
    if ratio is not None:
        lines.append(f'ours / semantic path: {ratio:.2f}')
    ax.text(0, 1, '\n'.join(lines), va='top', family='monospace', fontsize=7)
    by_key = {m.key: m for m in bench.mugs}
    for k, (scene, result, query_index, why) in enumerate(failures):
        r, c = 1 + k // 2, 4 * (k % 2)
        key = list(scene.mugs)[query_index]
        truth = scene.instances == scene.mugs[key]
        query = result.queries[query_index]
        chosen = result.instances == query.instance_id if query.instance_id else np.zeros_like(truth)
        overlay = scene.rgb.copy()
        overlay[truth] = (0.5 * overlay[truth] + [0, 127, 0]).astype(np.uint8)
        overlay[chosen] = (0.5 * overlay[chosen] + [127, 0, 0]).astype(np.uint8)
        mug = by_key[key]
        panels = [(f'{scene.seed}/{scene.view}: {mug.key} {mug.colour} {mug.pattern}', scene.rgb),
                  ('green truth, red chosen', overlay), (f'proposals ({why})', result.proposals.labels),
                  ('objectness', result.proposals.objectness)]
        for j, (title, image) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c + j])
            ax.imshow(image, cmap=None if image.ndim == 3 else ('tab20' if j == 2 else 'viridis'),
                      interpolation='nearest')
            ax.set_title(title, fontsize=6)
            ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _failures(report, examples):
    """List the views where ours chose wrong: (scene, result, query index, why)."""
    out = []
    for row in report['per_query']:
        if row['row'] != 'ours' or row['af']:
            continue
        scene, result = examples.get((row['scene'], row['view']), (None, None))
        if scene is None:
            continue
        index = list(scene.mugs).index(row['mug'])
        out.append((scene, result, index, 'proposal missed' if not row['recall'] else 'scores'))
    return out


def print_report(report):
    print(f"SynthMug seed {report['benchmark']['seed']}: {report['queries']} queries "
          f"(semantic {report['splits']['semantic']}, visual {report['splits']['visual']}); weights: "
          f"{report['calibration_source']}")
    for row, splits in report['rows'].items():
        cells = []
        for split, v in splits.items():
            parts = [f"{m} {v[m]['value']:.3f} [{v[m]['low']:.2f},{v[m]['high']:.2f}]"
                     for m in ('miou', 'bf_acc', 'af_acc')]
            cells.append(f"{split}: " + ' '.join(parts))
        print(f"{row:11s} recall {splits['all']['proposal_recall']['value']:.3f}  " + ' | '.join(cells))
    cost = {k: round(v, 3) for k, v in report['cost_seconds'].items()}
    print('cost per frame (median s):', json.dumps(cost), 'ours / semantic path:',
          report['cost_ratio_instance_over_semantic'])
    print('bars:', json.dumps(report['bars']))


def main(args):
    settings = from_arguments(LearnSettings, args, prefix='learn')
    calibration = None
    if args.calibration:
        with open(args.calibration) as f:
            calibration = json.load(f)
    report = run_personal_eval(args.model, args.seed, args.mugs, args.scenes, args.views, args.size,
                               tuple(args.train_views), args.class_count, tuple(args.rows), args.concepts_dir,
                               settings, args.dtype, args.report, image_size=args.image_size,
                               calibration=calibration, timestep=args.timestep,
                               masks_mode=args.prototype_masks,
                               semantic_cost=not args.no_semantic_cost)
    print_report(report)
    if args.fit_calibration:
        weights = fit_row_weights([r for r in report['records'] if 'raw' in r])
        with open(args.fit_calibration, 'w') as f:
            json.dump(dict(weights=weights, source=f"fitted on SynthMug seed {args.seed} "
                                                   f"({report['queries']} queries)"), f, indent=1)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=1)
    return 0


def add_parser(subparsers, name='personal'):
    """Register the `personal` evaluation on a subparsers object (e.g. the sub-verbs of `diffseg eval`)."""
    p = subparsers.add_parser(name, help='personalized referring segmentation on SynthMug (T2M Table 7)')
    p.add_argument('--model', default='', help="diffusers folder ('' = embedded SynthWorld model)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--mugs', type=int, default=12, help='personal mugs in the pool')
    p.add_argument('--scenes', type=int, default=36)
    p.add_argument('--views', type=int, default=2, help='views rendered per scene (a 50-degree sweep)')
    p.add_argument('--size', type=int, default=128, help='size the scenes are rendered at')
    p.add_argument('--image-size', type=int, default=0,
                   help="size the model sees them at (0 = the node's instance path: their own size, within "
                        "the model's training and default sizes)")
    p.add_argument('--train-views', type=int, nargs=2, default=[5, 10], help='views per mug: min max')
    p.add_argument('--class-count', type=int, default=16, help='regularisation images (other mugs)')
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=ROWS)
    p.add_argument('--concepts-dir', default=None, help='cache of learned concepts (reused when they fit)')
    p.add_argument('--calibration', default=None,
                   help='JSON of evidence weights per row fitted on other (validation) seeds; without it the '
                        'weights are fitted on this draw and the numbers are validation numbers')
    p.add_argument('--fit-calibration', default=None, help='write the weights fitted on this draw here')
    p.add_argument('--timestep', type=int, default=-1, help='-1 = the fused path default')
    p.add_argument('--prototype-masks', default='model', choices=['model', 'given'],
                   help="object masks in the training views: the model's own (default) or the renderer's")
    p.add_argument('--no-semantic-cost', action='store_true', help='skip timing the plain semantic path')
    p.add_argument('--dtype', default='float32')
    p.add_argument('--json', default=None)
    p.add_argument('--report', default=None, help='PNG report path')
    add_arguments(p, LearnSettings, prefix='learn')     # --learn-steps, --learn-lr, ...
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
