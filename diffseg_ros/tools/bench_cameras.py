"""`diffseg bench --cameras 1 2 4`: N cameras in one node (one model, batched) vs N one-camera nodes.

Each configuration runs in processes of its own, so each one's peak RSS (ru_maxrss: model loading
included) is its own: one process serving N cameras with `QueryEngine.segment_batch` (what the node's
worker runs per cycle), and N processes serving one camera each, run concurrently. Every process loads
the model, warms up, waits until all of its configuration are ready, then times `repeats` cycles. A cycle
serves every camera once; the N separate processes' cycle is the slowest one's (all cameras served).
The processes run the engine without ROS: a node adds the same rclpy libraries to every process, so the
memory ratios here are, if anything, less favourable to the one-node configuration than a robot's.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import cv2
import numpy as np

QUERIES = ['red mug', 'bottle']
BARS = {'one_node_peak_over_one_camera': 1.3, 'one_node_peak_over_separate': 0.5}


def camera_frame(seed, width, height):
    """Return a SynthWorld scene as a camera of this size would see it (RGB uint8)."""
    from ..synthworld import generate_scene
    rgb = generate_scene(seed, size=max(width, height)).rgb
    return np.ascontiguousarray(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))


def peak_rss_mb():
    """Return the process's peak resident set so far in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    """Serve `args.cameras` cameras in this process; print 'ready', wait for a line, time, print JSON."""
    from ..core.query_engine import EngineConfig, QueryEngine
    from ..core.segmenter import SegmenterConfig
    import torch
    config = EngineConfig(segmenter=SegmenterConfig(model_path=args.model, image_size=args.size,
                                                    method=args.method))
    engine = QueryEngine(config)
    loaded_mb = peak_rss_mb()
    engine.set_queries(QUERIES)
    frames = [camera_frame(args.seed + i, *args.frame) for i in range(args.cameras)]
    engine.segment_batch(frames)          # warm-up
    print('ready', flush=True)
    sys.stdin.readline()
    cycles = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine.segment_batch(frames)
        cycles.append(time.perf_counter() - start)
    print(json.dumps(dict(cameras=args.cameras, cycle_seconds=statistics.median(cycles), cycles=cycles,
                          loaded_rss_mb=loaded_mb, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads(),
                          describe={k: str(v) for k, v in engine.describe().items()})), flush=True)


def run_processes(counts, options):
    """Start one worker per entry of `counts` (its camera count), time them together; return their reports."""
    processes = []
    for index, cameras in enumerate(counts):
        command = [sys.executable, '-m', __name__, '--cameras', str(cameras), '--seed', str(10 * index),
                   '--repeats', str(options['repeats']), '--model', options['model'],
                   '--size', str(options['size']), '--method', options['method'],
                   '--frame', *map(str, options['frame'])]
        processes.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True))
    for process in processes:            # all loaded and warmed up: they start timing together
        if process.stdout.readline().strip() != 'ready':
            raise RuntimeError(f'a bench process failed (exit code {process.wait()})')
    for process in processes:
        process.stdin.write('go\n')
        process.stdin.flush()
    reports = [json.loads(process.stdout.readline()) for process in processes]
    for process in processes:
        process.wait()
    return reports


def run_cameras_bench(counts=(1, 2, 4), model='', size=0, method='', frame=(320, 240), repeats=3):
    """Measure one node serving N cameras vs N one-camera nodes for each N; return a JSON-able dict."""
    options = dict(model=model, size=size, method=method, frame=list(frame), repeats=repeats)
    one_camera = run_processes([1], options)[0]
    rows = {}
    for n in counts:
        together = one_camera if n == 1 else run_processes([n], options)[0]
        separate = [one_camera] if n == 1 else run_processes([1] * n, options)
        rows[n] = summary(n, together, separate, one_camera)
    largest = rows[max(counts)]
    return dict(model=model or 'embedded', input_size=size or 'model default', frame=list(frame),
                method=one_camera['describe']['method'], crf=one_camera['describe']['crf'],
                threads_per_process=one_camera['threads'], repeats=repeats, one_camera=one_camera,
                cameras=rows, bars={name: dict(bar=bar, measured=largest[name], cameras=max(counts),
                                               met=largest[name] <= bar) for name, bar in BARS.items()})


def summary(n, together, separate, one_camera):
    """Ratios of one configuration: cost per cycle and peak memory vs one camera and vs N separate nodes."""
    separate_cycle = max(report['cycle_seconds'] for report in separate)
    separate_peak = sum(report['peak_rss_mb'] for report in separate)
    return dict(
        one_node=dict(cycle_seconds=together['cycle_seconds'], peak_rss_mb=together['peak_rss_mb'],
                      loaded_rss_mb=together['loaded_rss_mb']),
        separate_nodes=dict(cycle_seconds=separate_cycle, peak_rss_mb_sum=separate_peak,
                            peak_rss_mb=[report['peak_rss_mb'] for report in separate]),
        one_node_cycle_over_one_camera=together['cycle_seconds'] / one_camera['cycle_seconds'],
        separate_cycle_over_one_camera=separate_cycle / one_camera['cycle_seconds'],
        one_node_peak_over_one_camera=together['peak_rss_mb'] / one_camera['peak_rss_mb'],
        separate_peak_over_one_camera=separate_peak / one_camera['peak_rss_mb'],
        one_node_peak_over_separate=together['peak_rss_mb'] / separate_peak)


def print_report(report):
    print(f"model: {report['model']}  input: {report['input_size']}  frames: {report['frame']}  method: "
          f"{report['method']} (crf {report['crf']})  threads/process: {report['threads_per_process']}")
    print(f"{'cameras':>7s} {'1-node s':>9s} {'N-node s':>9s} {'1-node/1cam':>12s} {'N-node/1cam':>12s} "
          f"{'1-node MB':>10s} {'N-node MB':>10s} {'mem 1-node/1cam':>16s} {'mem 1-node/N-node':>18s}")
    for n, row in report['cameras'].items():
        print(f"{n:>7} {row['one_node']['cycle_seconds']:9.3f} {row['separate_nodes']['cycle_seconds']:9.3f} "
              f"{row['one_node_cycle_over_one_camera']:12.2f} {row['separate_cycle_over_one_camera']:12.2f} "
              f"{row['one_node']['peak_rss_mb']:10.0f} {row['separate_nodes']['peak_rss_mb_sum']:10.0f} "
              f"{row['one_node_peak_over_one_camera']:16.2f} {row['one_node_peak_over_separate']:18.2f}")
    for name, bar in report['bars'].items():
        print(f"{name} at {bar['cameras']} cameras: {bar['measured']:.2f} (bar <= {bar['bar']}): "
              f"{'met' if bar['met'] else 'NOT met'}")


def main(argv=None):
    """Run one bench worker process (started by run_processes)."""
    parser = argparse.ArgumentParser(description='one process of `diffseg bench --cameras`')
    parser.add_argument('--cameras', type=int, required=True)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--model', default='')
    parser.add_argument('--size', type=int, default=0)
    parser.add_argument('--method', default='')
    parser.add_argument('--frame', type=int, nargs=2, default=[320, 240])
    worker(parser.parse_args(argv))


if __name__ == '__main__':
    from ..core.model_folder import quiet_model_libraries
    quiet_model_libraries()
    main()
