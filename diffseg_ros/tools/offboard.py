"""`diffseg offboard`: the segmentation node on an off-board GPU host, across a shaped link, measured.

Builds two hosts on this machine (tools/netns.py: robot and GPU-host network namespaces joined through a
link namespace; 50 Mbit/s tbf at each host's egress, 5 ms one-way delay and 1 % frame loss per direction
from the user-space relay tools/linkemu.py, this kernel having no netem). DDS crosses it with
config/fastdds_offboard.xml (UDPv4 unicast to the peer, no shared memory). The robot runs the SynthWorld
camera (JPEG on camera/image/compressed) and the planner (tools/offboard_planner.py); the GPU host runs
the node with `image_transport: compressed`. Reported, over the measurement window:

- bytes per camera frame on the robot -> GPU direction (every byte the robot's interface sent, discovery
  and acknowledgements included, over the frames the camera published) and its ratio to raw rgb8;
- result age at the planner (arrival wall time minus the answer's header stamp, the camera frame's; both
  namespaces share the machine's clock), p50 / p95 / max, against the node's own compute latency
  (its /diagnostics rolling mean); the answers are `--result`: ~/assignments (default: the JSON a planner
  acts on, a few hundred bytes) or ~/semantic (the label image, width x height bytes);
- answers per second, and the share of the node's published answers (its 'frames processed') that reached
  the planner over the whole run.

    sudo .venv/bin/diffseg offboard --json docs/offboard.json
    sudo .venv/bin/diffseg offboard --result semantic --json docs/offboard_semantic.json

Needs root (network namespaces, raw sockets). The issue's bars: answers >= 95 %, age p95 <= 2x compute
latency, bytes per frame <= 0.2x raw; `report['bars']` says which hold.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import netns


def config_folder():
    """Return the config/ folder: the source checkout's, else the installed package's share folder."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = os.path.join(os.path.dirname(package), 'config')
    if os.path.isdir(source):
        return source
    from ament_index_python.packages import get_package_share_directory
    return os.path.join(get_package_share_directory('diffseg_ros'), 'config')


CONFIG = config_folder()
PROFILE = os.path.join(CONFIG, 'fastdds_offboard.xml')
SCENE_SEED = 1_000_000_006    # the demo's held-out scene: a red mug among other objects
QUERY = 'red mug'
BARS = {'answers_delivered_min': 0.95, 'age_p95_over_latency_max': 2.0, 'bytes_ratio_max': 0.2}
STOP_TIMEOUT = 15.0


class Settings:
    """What one bench run does (defaults: the issue's link and camera)."""

    def __init__(self, width=640, height=480, rate=10.0, jpeg_quality=80, link_rate='50mbit', delay_ms=5.0,
                 loss=0.01, warmup=8.0, window=45.0, model_path='', frames=8, seed=0, split_cpus=True,
                 result='assignments'):
        self.width, self.height, self.rate, self.jpeg_quality = width, height, rate, jpeg_quality
        self.link_rate, self.delay_ms, self.loss = link_rate, delay_ms, loss
        self.warmup, self.window, self.model_path = warmup, window, model_path
        self.frames, self.seed, self.split_cpus, self.result = frames, seed, split_cpus, result

    def as_dict(self):
        return dict(vars(self))


def ros_environment(testbed, role, domain, log_dir):
    """Return the environment of one host's ROS processes: the two-host profile, this and the peer's IP."""
    peer = 'gpu' if role == 'robot' else 'robot'
    env = {key: value for key, value in os.environ.items() if not key.startswith('ROS_')}
    env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='SUBNET',
               FASTDDS_DEFAULT_PROFILES_FILE=PROFILE, DIFFSEG_DDS_LOCAL_IP=testbed.ips[role],
               DIFFSEG_DDS_PEER_IP=testbed.ips[peer], AMENT_PREFIX_PATH=sys.prefix, ROS_LOG_DIR=str(log_dir),
               RCUTILS_COLORIZED_OUTPUT='0', PYTHONUNBUFFERED='1')
    env.pop('FASTRTPS_DEFAULT_PROFILES_FILE', None)
    return env


class Process:
    """A program in a namespace, its output in a log file; stop() sends SIGINT, then SIGKILL."""

    def __init__(self, name, command, env, log_dir):
        self.name = name
        self.log_path = os.path.join(log_dir, f'{name}.log')
        self._log = open(self.log_path, 'wb')
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self, tail=3000):
        with open(self.log_path, errors='replace') as file:
            return file.read()[-tail:]

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self._log.close()
        return self.process.returncode


def commands(testbed, settings, work_dir):
    """Return {name: (namespace role, argv)} of the relay, node, camera and planner, in start order."""
    s, python = settings, [sys.executable, '-m']
    model = ['-p', f'model_path:={os.path.abspath(s.model_path)}'] if s.model_path else []
    camera = {'width': s.width, 'height': s.height, 'rate': float(s.rate), 'jpeg_quality': s.jpeg_quality,
              'cache_frames': 'true', 'scenes': 1, 'frames_per_scene': s.frames, 'seed': SCENE_SEED}
    return {
        'linkemu': ('link', python + [
            'diffseg_ros.tools.linkemu', testbed.interfaces['link_robot'], testbed.interfaces['link_gpu'],
            '--loss', str(s.loss), '--delay-ms', str(s.delay_ms), '--seed', str(s.seed),
            '--stats', os.path.join(work_dir, 'link.json')]),
        'node': ('gpu', python + [
            'diffseg_ros.node', '--ros-args', '--params-file', os.path.join(CONFIG, 'diffseg.yaml'),
            '-p', 'image_transport:=compressed', '-r', 'image:=camera/image', '-p', 'diagnostics_period:=0.5',
            *model]),
        'camera': ('robot', python + ['diffseg_ros.ros.synth_camera', '--ros-args',
                                      *[arg for key, value in camera.items()
                                        for arg in ('-p', f'{key}:={value}')]]),
        'planner': ('robot', python + [
            'diffseg_ros.tools.offboard_planner', '--out', os.path.join(work_dir, 'planner.json'),
            '--interface', testbed.interfaces['robot'], '--query', QUERY, '--warmup', str(s.warmup),
            '--window', str(s.window), '--result', s.result]),
    }


def cpu_split(enabled):
    """Return {role: (taskset prefix, CPU count)}: the GPU host's node on the last CPU, the rest elsewhere.

    Two computers do not share cores; on one machine the node's torch threads would fight the camera, the
    relay and the planner for them, and an oversubscribed OpenMP pool stretches single frames several
    times, which the result age would charge to the link. Off (or on a one-CPU machine) nothing is pinned.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        return {role: ([], len(cpus)) for role in ('robot', 'gpu', 'link')}
    gpu, rest = cpus[-max(1, len(cpus) // 2):], cpus[:-max(1, len(cpus) // 2)]
    pin = {'gpu': gpu, 'robot': rest, 'link': rest}
    return {role: (['taskset', '-c', ','.join(map(str, chosen))], len(chosen))
            for role, chosen in pin.items()}


def start_processes(testbed, settings, domain, work_dir):
    """Start relay, node, camera and planner, each in its namespace (and CPUs); return {name: Process}."""
    environments = {role: ros_environment(testbed, role, domain, work_dir) for role in ('robot', 'gpu')}
    environments['link'] = os.environ.copy()
    pins = cpu_split(settings.split_cpus)
    environments['gpu']['OMP_NUM_THREADS'] = str(pins['gpu'][1])   # torch: one thread per CPU it has
    return {name: Process(name, testbed.prefix(role) + pins[role][0] + argv, environments[role], work_dir)
            for name, (role, argv) in commands(testbed, settings, work_dir).items()}


def percentile(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def window_numbers(record, settings):
    """Judge the planner's record: bytes per frame, result age, answers per second, compute latency."""
    window = record['window']
    start, end = window['start'], window['end']
    answers = [(arrival, stamp) for arrival, stamp in record['answers'] if start <= arrival <= end]
    frames = [(stamp, size) for _, stamp, size in record['frames'] if start <= stamp <= end]
    ages = [arrival - stamp for arrival, stamp in answers]
    latencies = [float(values['inference latency mean (s)']) for arrival, values in record['diagnostics']
                 if start <= arrival <= end and values.get('inference latency mean (s)')]
    sent = window['counters_end']['tx_bytes'] - window['counters_start']['tx_bytes']
    received = window['counters_end']['rx_bytes'] - window['counters_start']['rx_bytes']
    raw = settings.width * settings.height * 3
    per_frame = sent / len(frames) if frames else None
    seconds = end - start
    return {
        'window_s': round(seconds, 2),
        'frames_sent': len(frames), 'frames_expected': int(round(seconds * settings.rate)),
        'jpeg_bytes_mean': float(np.mean([size for _, size in frames])) if frames else None,
        'robot_to_gpu_bytes': sent, 'gpu_to_robot_bytes': received,
        'bytes_per_frame': per_frame, 'raw_rgb8_bytes': raw,
        'bytes_ratio_to_raw': per_frame / raw if per_frame else None,
        'link_mbit_per_s_robot_to_gpu': sent * 8 / seconds / 1e6,
        'link_mbit_per_s_gpu_to_robot': received * 8 / seconds / 1e6,
        'answers': len(answers), 'answers_per_s': len(answers) / seconds,
        'age_s': {'p50': percentile(ages, 50), 'p95': percentile(ages, 95), 'max': max(ages, default=None)},
        'compute_latency_s': float(np.median(latencies)) if latencies else None,
        'compute_latency_reports': len(latencies),
    }


def delivered_numbers(record):
    """Return the share of the node's published answers (its own count) that reached the planner."""
    received, processed = len(record['answers']), record['processed']
    return {'answers_received_total': received, 'answers_published_total': processed,
            'answers_delivered': received / processed if processed else None}


def judge(numbers):
    """Return {bar: (value, limit, holds)} for the issue's three bars."""
    latency, age95 = numbers['compute_latency_s'], numbers['age_s']['p95']
    age_ratio = age95 / latency if latency and age95 is not None else None
    values = {'answers_delivered_min': numbers['answers_delivered'],
              'age_p95_over_latency_max': age_ratio, 'bytes_ratio_max': numbers['bytes_ratio_to_raw']}
    bars = {}
    for name, value in values.items():
        limit = BARS[name]
        holds = value is not None and (value >= limit if name.endswith('_min') else value <= limit)
        bars[name] = {'value': value, 'limit': limit, 'holds': bool(holds)}
    return bars


def wait_planner(processes, timeout):
    """Wait for the planner to end; raise RuntimeError with the logs when it fails or a process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = processes['planner'].process.poll()
        if code is not None:
            if code:
                raise RuntimeError(failure('planner failed', processes))
            return
        dead = [name for name, p in processes.items() if name != 'planner' and p.process.poll() is not None]
        if dead:
            raise RuntimeError(failure(f'{dead} exited early', processes))
        time.sleep(0.5)
    raise RuntimeError(failure(f'the planner did not finish within {timeout:.0f} s', processes))


def failure(what, processes):
    logs = '\n'.join(f'--- {name} ---\n{p.log()}' for name, p in processes.items())
    return f'{what}\n{logs}'


def run_bench(settings, work_dir, domain=None):
    """Run the whole bench once; return the report (raises RuntimeError when a step fails)."""
    netns.remove_stale()
    domain = domain if domain is not None else 150 + os.getpid() % 80
    testbed, processes = netns.Testbed(settings.link_rate), {}
    started = time.monotonic()
    try:
        testbed.create()
        processes = start_processes(testbed, settings, domain, work_dir)
        wait_planner(processes, timeout=240.0 + settings.warmup + settings.window)
        with open(os.path.join(work_dir, 'planner.json')) as file:
            record = json.load(file)
        qdiscs = {role: testbed.qdisc(role) for role in ('robot', 'gpu')}
    finally:
        for name in ('planner', 'camera', 'node', 'linkemu'):
            if name in processes:
                processes[name].stop()
        testbed.close()
    return build_report(settings, record, qdiscs, work_dir, time.monotonic() - started)


def build_report(settings, record, qdiscs, work_dir, seconds):
    numbers = {**window_numbers(record, settings), **delivered_numbers(record)}
    link_file = os.path.join(work_dir, 'link.json')
    link = json.load(open(link_file)) if os.path.exists(link_file) else None
    return {'settings': settings.as_dict(), 'query': record['query'], 'result_topic': f'~/{settings.result}',
            'numbers': numbers,
            'bars': judge(numbers), 'link_relay': link, 'egress_qdiscs': qdiscs,
            'bench_seconds': round(seconds, 1)}


def add_parser(subparsers):
    p = subparsers.add_parser('offboard', help='the node on a GPU host across a shaped link (root): '
                                               'bytes per frame, result age, answers delivered')
    defaults = Settings()
    p.add_argument('--json', default=None, help='write the report here (e.g. docs/offboard.json)')
    p.add_argument('--window', type=float, default=defaults.window, help='seconds of measurement')
    p.add_argument('--warmup', type=float, default=defaults.warmup, help='seconds after the first answer')
    p.add_argument('--jpeg-quality', type=int, default=defaults.jpeg_quality)
    p.add_argument('--rate', type=float, default=defaults.rate, help='camera frames per second')
    p.add_argument('--size', type=int, nargs=2, default=[defaults.width, defaults.height], metavar=('W', 'H'))
    p.add_argument('--link-rate', default=defaults.link_rate, help='tbf rate, e.g. 50mbit')
    p.add_argument('--delay-ms', type=float, default=defaults.delay_ms, help='one-way delay')
    p.add_argument('--loss', type=float, default=defaults.loss, help='frame loss per direction (0.01 = 1 %%)')
    p.add_argument('--result', default=defaults.result, choices=('assignments', 'semantic'),
                   help="the planner's answers: ~/assignments (JSON, what a planner acts on) or ~/semantic "
                        '(the label image, width x height bytes)')
    p.add_argument('--model', default='', help="SD diffusers folder for the node ('' = embedded)")
    p.add_argument('--work-dir', default=None, help='folder for logs and raw records (default: a temp dir)')
    p.add_argument('--no-cpu-split', action='store_true',
                   help="don't pin the GPU host's node and the robot's processes to separate CPUs")
    p.set_defaults(func=main)


def main(args):
    """Run the bench, print the report, write it; exit 0 when every bar holds, 1 otherwise."""
    settings = Settings(width=args.size[0], height=args.size[1], rate=args.rate,
                        jpeg_quality=args.jpeg_quality, link_rate=args.link_rate, delay_ms=args.delay_ms,
                        loss=args.loss, warmup=args.warmup, window=args.window, model_path=args.model,
                        split_cpus=not args.no_cpu_split, result=args.result)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix='diffseg-offboard-')
    os.makedirs(work_dir, exist_ok=True)
    report = run_bench(settings, work_dir)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, 'w') as file:
            file.write(text + '\n')
    return 0 if all(bar['holds'] for bar in report['bars'].values()) else 1
