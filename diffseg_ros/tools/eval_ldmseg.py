"""`diffseg eval ldmseg`: LDMSeg on held-out SynthWorld scenes, class-agnostic PQ; JSON + PNG plots.

Truth = SynthWorld's panoptic segments (every visible object and each furniture surface; too-small objects
void). Reported:
- steps:    PQ / SQ / RQ of unconditional sampling at 5, 10, 20, 50 DDIM steps (paper fig. 7)
- sparsity: PQ vs drop rate d and block size B (paper fig. 9: B x B blocks of the truth dropped with
            probability d) for LDMSeg inpainting, a nearest-neighbour fill of the kept labels, and the
            kept labels alone
- sequence: labels propagated along a moving-camera sequence (camera_orbit): frame 0 starts from its
            truth; each next frame gets the previous frame's labels lifted with depth and projected, then
            completed (LDMSeg or nearest-neighbour). Id consistency = share of the truth segments present in
            frame 0 that are matched (IoU > 0.5) by a segment carrying their frame-0 id.
- bars:     at d = 0.9, inpainting PQ >= nearest-neighbour PQ + 0.10 (per block size);
            PQ at 10 steps >= 0.98 x PQ at 50 steps.
"""
import argparse
import json
import os

import numpy as np
from tqdm import tqdm

from ..core.geometry import invert_pose
from ..ldmseg import LDMSeg, lift_labels, project_labels
from ..ldmseg.inpaint import block_drop_mask
from ..ldmseg.pipeline import fill_from_nearest
from ..ldmseg.metrics import match_segments, panoptic_quality
from ..synthworld import camera_orbit, generate_scene, render, visible_objects
from ..synthworld.export import STUFF_SEGMENT_OFFSET

EVAL_SEED = 1_000_000_000      # held-out scenes; training uses seeds below 10^9
STEPS = (5, 10, 20, 50)
DROP_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)
BLOCKS = (4, 8, 16, 32, 64)    # the paper's 16..256 px blocks at 512 px, scaled to 128 px


# --- truth and baselines ----------------------------------------------------------------------------------
def panoptic_truth(instances, stuff):
    """Segment ids: object instance ids, furniture 1000 + stuff code, 0 = void."""
    stuff_ids = np.where(stuff > 0, STUFF_SEGMENT_OFFSET + stuff.astype(np.int64), 0)
    return np.where(instances > 0, instances, stuff_ids)


def scene_truth(scene):
    return panoptic_truth(scene.instances, scene.stuff)


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- experiments -------------------------------------------------------------------------------------------
def eval_steps(model, scenes, truths, steps_list, batch, seed):
    out = {}
    for steps in steps_list:
        preds = []
        for group in chunks(list(range(len(scenes))), batch):
            preds += list(model.sample(np.stack([scenes[i].rgb for i in group]), steps=steps, seed=seed))
        out[str(steps)] = panoptic_quality(preds, truths)
    return out


def eval_sparsity(model, scenes, truths, drop_rates, blocks, steps, batch, seed):
    """PQ of inpainting, nearest-neighbour fill and kept labels alone for each (block, drop rate)."""
    out = {'ldmseg': {}, 'nearest': {}, 'projected': {}}
    for block in blocks:
        for method in out:
            out[method][str(block)] = {}
        for drop in tqdm(drop_rates, desc=f'sparsity B={block}', leave=False):
            sparse = []
            for i, truth in enumerate(truths):
                rng = np.random.default_rng([seed, block, int(drop * 1000), i])
                sparse.append(np.where(block_drop_mask(*truth.shape, drop, block, rng), truth, 0))
            completed = []
            for group in chunks(list(range(len(scenes))), batch):
                images = np.stack([scenes[i].rgb for i in group])
                labels = np.stack([sparse[i] for i in group])
                completed += list(model.complete(images, labels, steps=steps, seed=seed))
            out['ldmseg'][str(block)][str(drop)] = panoptic_quality(completed, truths)
            filled = [fill_from_nearest(s) for s in sparse]
            out['nearest'][str(block)][str(drop)] = panoptic_quality(filled, truths)
            out['projected'][str(block)][str(drop)] = panoptic_quality(sparse, truths)
    return out


def render_sequence(scene, frames):
    """RGB, depth, pose and panoptic truth of `frames` views along camera_orbit."""
    views = []
    for pose in camera_orbit(scene, frames):
        frame = render(scene.spec, pose, scene.K, scene.width, scene.height)
        _, instances = visible_objects(scene.spec.objects, frame.instances)
        truth = panoptic_truth(instances, frame.stuff)
        views.append(dict(rgb=frame.rgb, depth=frame.depth, pose=pose, truth=truth))
    return views


def id_consistency(pred, truth, tracked_ids):
    """Share of truth segments in `tracked_ids` matched by a predicted segment with the same id."""
    present = [g for g in np.unique(truth) if g in tracked_ids]
    if not present:
        return None
    matches, _ = match_segments(pred, truth)
    return sum(1 for g in present if g in matches and matches[g][0] == g) / len(present)


def propagate(views, K, fill):
    """Run label propagation along a sequence; fill(k, rgb, sparse) completes frame k."""
    labels = views[0]['truth']
    tracked = set(np.unique(labels)) - {0}
    rows = []
    for k in range(1, len(views)):
        points, point_labels = lift_labels(views[k - 1]['depth'], K, labels, views[k - 1]['pose'])
        height, width = labels.shape
        sparse = project_labels(points, point_labels, K, width, height, invert_pose(views[k]['pose']))
        labels = fill(views[k]['rgb'], sparse)
        rows.append(dict(frame=k, id_consistency=id_consistency(labels, views[k]['truth'], tracked),
                         pq=panoptic_quality([labels], [views[k]['truth']])['pq'],
                         known_share=float((sparse != 0).mean())))
    return rows


def eval_sequences(model, sequence_seeds, frames, steps, seed):
    out = {'ldmseg': [], 'nearest': [], 'projected': []}
    fills = {'ldmseg': lambda rgb, sparse: model.complete(rgb, sparse, steps=steps, seed=seed),
             'nearest': lambda rgb, sparse: fill_from_nearest(sparse),
             'projected': lambda rgb, sparse: sparse}
    for scene_seed in tqdm(sequence_seeds, desc='sequences', leave=False):
        scene = generate_scene(scene_seed, width=model.config.size[0], height=model.config.size[1])
        views = render_sequence(scene, frames)
        for method, fill in fills.items():
            out[method].append(propagate(views, scene.K, fill))
    summary = {}
    for method, runs in out.items():
        values = [r['id_consistency'] for run in runs for r in run if r['id_consistency'] is not None]
        summary[method] = dict(id_consistency=float(np.mean(values)) if values else 0.0,
                               pq=float(np.mean([r['pq'] for run in runs for r in run])), runs=runs)
    return summary


def check_bars(report):
    bars = {}
    if 'sparsity' in report:
        sparse = report['sparsity']
        for block in sparse['ldmseg']:
            drops = sorted(sparse['ldmseg'][block], key=float)
            top = drops[-1]
            gain = float(sparse['ldmseg'][block][top]['pq'] - sparse['nearest'][block][top]['pq'])
            bars[f'inpaint_vs_nearest_d{top}_B{block}'] = dict(gain=gain, met=bool(gain >= 0.10))
    if 'steps' in report and '10' in report['steps'] and '50' in report['steps']:
        ratio = float(report['steps']['10']['pq'] / max(report['steps']['50']['pq'], 1e-9))
        bars['pq10_vs_pq50'] = dict(ratio=ratio, met=bool(ratio >= 0.98))
    return bars


# --- plots --------------------------------------------------------------------------------------------------
def colourise(ids):
    """Stable pseudo-random colour per id (the same id has the same colour in every panel); void black."""
    ids = np.asarray(ids, np.int64)
    colours = ((ids[..., None] * np.array([2654435761, 2246822519, 3266489917])) >> 13) % 200 + 55
    return np.where(ids[..., None] == 0, 0, colours).astype(np.uint8)


def write_plots(report, out_dir, examples=None):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    paths = {}
    if 'sparsity' in report:
        fig, ax = plt.subplots(figsize=(6, 4))
        sparse = report['sparsity']
        for i, block in enumerate(sparse['ldmseg']):
            colour = f'C{i}'
            for method, style in (('ldmseg', '-'), ('nearest', '--'), ('projected', ':')):
                drops = sorted(sparse[method][block], key=float)
                ax.plot([float(d) for d in drops], [sparse[method][block][d]['pq'] for d in drops], style,
                        color=colour, marker='o' if method == 'ldmseg' else None,
                        label=f'B={block}' if method == 'ldmseg' else None)
        ax.plot([], [], 'k-', label='LDMSeg inpainting')
        ax.plot([], [], 'k--', label='nearest-neighbour fill')
        ax.plot([], [], 'k:', label='kept labels only')
        ax.set_xlabel('drop rate d')
        ax.set_ylabel('PQ')
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths['sparsity'] = os.path.join(out_dir, 'sparsity.png')
        fig.savefig(paths['sparsity'], dpi=100)
        plt.close(fig)
    if 'steps' in report:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        steps = sorted(report['steps'], key=int)
        for key in ('pq', 'sq', 'rq'):
            values = [report['steps'][s][key] for s in steps]
            ax.plot([int(s) for s in steps], values, marker='o', label=key.upper())
        ax.set_xlabel('DDIM steps')
        ax.set_ylim(0, 1)
        ax.legend()
        fig.tight_layout()
        paths['steps'] = os.path.join(out_dir, 'steps.png')
        fig.savefig(paths['steps'], dpi=100)
        plt.close(fig)
    if 'sequence' in report:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for method, entry in report['sequence'].items():
            frames = sorted({r['frame'] for run in entry['runs'] for r in run})
            for ax, key in zip(axes, ('id_consistency', 'pq')):
                means = [np.mean([r[key] for run in entry['runs'] for r in run
                                  if r['frame'] == f and r[key] is not None] or [0]) for f in frames]
                ax.plot(frames, means, marker='o', label=method)
                ax.set_xlabel('frame')
                ax.set_ylabel(key)
                ax.set_ylim(0, 1)
        axes[0].legend()
        fig.tight_layout()
        paths['sequence'] = os.path.join(out_dir, 'sequence.png')
        fig.savefig(paths['sequence'], dpi=100)
        plt.close(fig)
    if examples:
        titles = list(examples[0])
        fig, axes = plt.subplots(len(examples), len(titles), figsize=(2 * len(titles), 2 * len(examples)),
                                 squeeze=False)
        for r, row in enumerate(examples):
            for c, title in enumerate(titles):
                image = row[title]
                axes[r, c].imshow(image if image.ndim == 3 else colourise(image), interpolation='nearest')
                axes[r, c].set_title(title, fontsize=8)
                axes[r, c].axis('off')
        fig.tight_layout()
        paths['examples'] = os.path.join(out_dir, 'examples.png')
        fig.savefig(paths['examples'], dpi=100)
        plt.close(fig)
    return paths


def example_rows(model, scenes, truths, steps, seed, drop=0.7, block=8, count=3):
    rows = []
    for i, (scene, truth) in enumerate(zip(scenes[:count], truths[:count])):
        kept = block_drop_mask(*truth.shape, drop, block, np.random.default_rng([seed, i]))
        sparse = np.where(kept, truth, 0)
        rows.append({'image': scene.rgb, 'truth': truth,
                     'sample': model.sample(scene.rgb, steps=steps, seed=seed),
                     f'kept (d={drop}, B={block})': sparse,
                     'inpainted': model.complete(scene.rgb, sparse, steps=steps, seed=seed),
                     'nearest fill': fill_from_nearest(sparse)})
    return rows


# --- entry point --------------------------------------------------------------------------------------------
def run(args):
    import torch
    torch.set_num_threads(args.threads)
    model = LDMSeg.load(args.model, fill_void=args.fill_void,
                        **({'samples': args.samples} if args.samples else {}))
    width, height = model.config.size
    seeds = range(args.seed, args.seed + args.scenes)
    scenes = [generate_scene(s, width=width, height=height) for s in tqdm(seeds, desc='scenes', leave=False)]
    truths = [scene_truth(s) for s in scenes]
    inference = {name: getattr(model.config, name)
                 for name in ('resample', 'samples', 'mask_threshold', 'min_area', 'fill_void')}
    report = dict(model=getattr(model, 'path', ''), seed=args.seed, scenes=args.scenes, size=[width, height],
                  inference=inference)
    if not args.skip_steps:
        report['steps'] = eval_steps(model, scenes, truths, args.steps_list, args.batch, args.sample_seed)
    if not args.skip_sparsity:
        report['sparsity'] = eval_sparsity(model, scenes, truths, args.drop_rates, args.blocks, args.steps,
                                           args.batch, args.sample_seed)
    if args.sequences:
        sequence_seeds = range(args.seed + args.scenes, args.seed + args.scenes + args.sequences)
        report['sequence'] = eval_sequences(model, sequence_seeds, args.frames, args.sequence_steps,
                                            args.sample_seed)
    report['bars'] = check_bars(report)
    os.makedirs(args.out, exist_ok=True)
    examples = example_rows(model, scenes, truths, args.steps, args.sample_seed) if args.examples else None
    report['plots'] = write_plots(report, args.out, examples)
    with open(os.path.join(args.out, 'report.json'), 'w') as f:
        json.dump(report, f, indent=1, default=float)
    return report


def print_summary(report):
    for steps, entry in report.get('steps', {}).items():
        print(f"sampling {steps:>2} steps: PQ {entry['pq']:.3f}  SQ {entry['sq']:.3f}  RQ {entry['rq']:.3f}")
    for method, blocks in report.get('sparsity', {}).items():
        for block, drops in blocks.items():
            print(f'{method:9s} B={block:>3}: ' + '  '.join(f"d={d} {v['pq']:.3f}" for d, v in drops.items()))
    for method, entry in report.get('sequence', {}).items():
        print(f"sequence {method:9s}: id consistency {entry['id_consistency']:.3f}  PQ {entry['pq']:.3f}")
    for name, bar in report['bars'].items():
        print(f"bar {name}: {'met' if bar['met'] else 'NOT met'} {bar}")


def main(args):
    report = run(args)
    print_summary(report)
    return 0


def add_parser(subparsers, name='ldmseg'):
    """Register the LDMSeg evaluation (as `diffseg eval ldmseg` once wired into the eval verb)."""
    p = subparsers.add_parser(name, help='LDMSeg PQ: sampling, inpainting sparsity, label propagation',
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='', help="LDMSeg folder ('' = embedded SynthWorld model)")
    p.add_argument('--out', default='runs/eval_ldmseg', help='folder for report.json and the PNG plots')
    p.add_argument('--seed', type=int, default=EVAL_SEED, help='first held-out scene seed')
    p.add_argument('--scenes', type=int, default=50)
    p.add_argument('--steps', type=int, default=50, help='DDIM steps of the inpainting sweep')
    p.add_argument('--steps-list', type=int, nargs='+', default=list(STEPS))
    p.add_argument('--drop-rates', type=float, nargs='+', default=list(DROP_RATES))
    p.add_argument('--blocks', type=int, nargs='+', default=list(BLOCKS))
    p.add_argument('--sequences', type=int, default=3, help='moving-camera sequences (0 = skip)')
    p.add_argument('--frames', type=int, default=12)
    p.add_argument('--sequence-steps', type=int, default=20)
    p.add_argument('--batch', type=int, default=8, help='images per sampling batch')
    p.add_argument('--sample-seed', type=int, default=0, help='seed of the initial noise')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--skip-steps', action='store_true')
    p.add_argument('--skip-sparsity', action='store_true')
    p.add_argument('--no-fill-void', dest='fill_void', action='store_false',
                   help="the paper's post-processing: unsure pixels and small segments stay void")
    p.add_argument('--samples', type=int, default=0,
                   help="inpainting samples merged by vote (0 = the model's setting, 1 = the paper's)")
    p.add_argument('--no-examples', dest='examples', action='store_false')
    p.set_defaults(func=main)
    return p


if __name__ == '__main__':
    parser = argparse.ArgumentParser(prog='eval_ldmseg')
    add_parser(parser.add_subparsers(dest='verb', required=True))
    parsed = parser.parse_args()
    raise SystemExit(parsed.func(parsed))
