"""`diffseg synth` verbs: export SynthWorld datasets and preview scenes."""
import argparse
import textwrap

import numpy as np


def parse_size(text):
    """Parse 'W' or 'WxH' into (width, height)."""
    parts = text.lower().split('x')
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f'size must be W or WxH, got {text!r}')
    width = int(parts[0])
    return width, int(parts[-1])


def add_parser(subparsers):
    """Register the `synth` verb (sub-verbs export, preview, camera) on an argparse subparsers object."""
    synth = subparsers.add_parser('synth', help='SynthWorld procedural scenes')
    verbs = synth.add_subparsers(dest='synth_verb', required=True)

    export = verbs.add_parser('export', help='write a dataset (rgb, depth, instances, scenes, COCO panoptic)')
    export.add_argument('--out', required=True, help='output directory')
    export.add_argument('--seed', type=int, default=0, help='first seed')
    export.add_argument('--scenes', type=int, default=100, help='number of scenes (seeds seed..seed+N-1)')
    export.add_argument('--size', type=parse_size, default=(128, 128), help='W or WxH (default 128)')
    export.add_argument('--fov', type=float, default=55.0, help='horizontal field of view, degrees')
    export.add_argument('--depth-format', choices=('npy', 'png16'), default='npy')
    export.add_argument('--workers', type=int, default=0, help='processes (0 = this one)')
    export.set_defaults(func=run_export)

    preview = verbs.add_parser('preview', help='save RGB / depth / instances of scenes with their captions')
    preview.add_argument('--seed', type=int, default=0, help='first seed')
    preview.add_argument('--count', type=int, default=1, help='number of scenes (rows)')
    preview.add_argument('--size', type=parse_size, default=(128, 128), help='W or WxH (default 128)')
    preview.add_argument('--out', required=True, help='output PNG')
    preview.set_defaults(func=run_preview)

    camera = verbs.add_parser('camera', add_help=False,
                              help='stream scenes as a ROS camera (rgb, depth, camera_info, points)')
    camera.add_argument('ros_args', nargs='*', help="ROS arguments, e.g. --ros-args -p seed:=3 -p rate:=5.0")
    camera.set_defaults(func=run_camera)
    return synth


def run_camera(args):
    """Run the synth_camera node; everything after `camera` is passed to ROS (`--ros-args -p ...`)."""
    from ..ros.synth_camera import main
    return main(['synth_camera', *args.ros_args])


def run_export(args):
    """Export scenes with a progress bar."""
    from tqdm import tqdm

    from ..synthworld.export import export_scenes
    seeds = range(args.seed, args.seed + args.scenes)
    bar = tqdm(total=args.scenes, unit='scene')
    out = export_scenes(args.out, seeds, width=args.size[0], height=args.size[1], fov_deg=args.fov,
                        depth_format=args.depth_format, workers=args.workers, progress=lambda: bar.update(1))
    bar.close()
    print(f'wrote {args.scenes} scenes to {out}')
    return 0


def colourize_ids(ids):
    """Distinct colours per integer id (0 = black)."""
    hues = (np.asarray(ids, np.int64) * 47) % 180
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 255)], -1).astype(np.uint8)
    import cv2
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    rgb[np.asarray(ids) == 0] = 0
    return rgb


def colourize_depth(depth):
    """Turbo-coloured depth (near = red), invalid = black."""
    import cv2
    valid = np.isfinite(depth)
    lo, hi = (depth[valid].min(), depth[valid].max()) if valid.any() else (0.0, 1.0)
    scaled = np.where(valid, (depth - lo) / max(hi - lo, 1e-6), 0)
    rgb = cv2.cvtColor(cv2.applyColorMap((255 * (1 - scaled)).astype(np.uint8), cv2.COLORMAP_TURBO),
                       cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def preview_image(scene, zoom=3):
    """One row: RGB | depth | instances, upscaled, with the caption and phrases written underneath."""
    import cv2
    tiles = [scene.rgb, colourize_depth(scene.depth), colourize_ids(scene.instances)]
    tiles = [cv2.resize(t, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST) for t in tiles]
    row = np.concatenate(tiles, 1)
    text = f'seed {scene.seed}: {scene.caption}  |  ' + ', '.join(
        f'{o.instance_id}:{o.phrase}({o.visible_pixels})' for o in scene.objects)
    lines = textwrap.wrap(text, width=row.shape[1] // 9)
    panel = np.full((18 * len(lines) + 8, row.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(panel, line, (4, 16 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([row, panel], 0)


def run_preview(args):
    """Render `count` scenes from `seed` and save a preview grid."""
    import cv2

    from ..synthworld import generate_scene
    rows = [preview_image(generate_scene(s, width=args.size[0], height=args.size[1]))
            for s in range(args.seed, args.seed + args.count)]
    grid = np.concatenate(rows, 0)
    if not cv2.imwrite(args.out, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise SystemExit(f'could not write {args.out}')
    print(f'saved {args.out}')
    return 0


def main(argv=None):
    """Run the `synth` verbs standalone (`python -m diffseg_ros.tools.synth_cli synth preview ...`)."""
    parser = argparse.ArgumentParser(prog='diffseg')
    add_parser(parser.add_subparsers(dest='verb', required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    raise SystemExit(main())
