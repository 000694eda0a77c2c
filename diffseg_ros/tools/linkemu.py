"""A lossy, delayed Ethernet link in user space: relay frames between two interfaces (AF_PACKET).

The off-board bench (`diffseg offboard`) joins the robot's and the GPU host's network namespaces through
a third namespace where this relay runs, because the kernel here has no netem (CONFIG_NET_SCH_NETEM is not
set) and no gact action to drop packets. Per direction one thread reads frames from one interface, drops a
seeded random `loss` fraction and queues the rest; a second thread sends each frame to the other interface
`delay` seconds after it arrived (a constant delay keeps the order, so the queue is a FIFO). The rate is
shaped by the kernel (a tbf qdisc at the endpoints, set up by the bench), not here.

    python -m diffseg_ros.tools.linkemu IF_A IF_B --loss 0.01 --delay-ms 5 --stats stats.json

Runs until SIGINT or SIGTERM; `--stats` is rewritten every second and at exit with per-direction counters.
Needs CAP_NET_RAW (root) in the namespace that holds both interfaces.
"""
import argparse
from collections import deque
import json
import os
import random
import signal
import socket
import struct
import sys
import threading
import time

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4        # sll_pkttype of frames this host sent on the interface (our own relayed ones)
PACKET_STATISTICS = 6      # getsockopt: struct tpacket_stats {tp_packets, tp_drops}, reset on read
SOL_PACKET = 263
SOCKET_BUFFER = 8 << 20    # bytes: absorbs a burst of a whole large DDS sample
MAX_FRAME = 65536
POLL_S = 0.2               # how often blocked threads look at the stop flag


def open_port(interface):
    """Open a raw socket bound to one interface that sees every frame arriving there."""
    port = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    port.bind((interface, ETH_P_ALL))
    for option, fallback in ((getattr(socket, 'SO_RCVBUFFORCE', 33), socket.SO_RCVBUF),
                             (getattr(socket, 'SO_SNDBUFFORCE', 32), socket.SO_SNDBUF)):
        try:   # FORCE ignores net.core.rmem_max (needs CAP_NET_ADMIN)
            port.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            port.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
    port.settimeout(POLL_S)
    return port


def kernel_drops(port):
    """Return the frames the kernel dropped on this socket since the last call (receive buffer full)."""
    packets, drops = struct.unpack('II', port.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return drops


def clear_udp_checksum(frame):
    """Zero the UDP checksum of an unfragmented IPv4/UDP frame (bytes in, bytes out).

    veth leaves checksums to "hardware" (checksum offload): a frame read from a veth may carry only the
    pseudo-header sum, and the receiving stack would drop it once relayed. Zero means "no checksum", legal
    for UDP over IPv4. Fragments of a large datagram were checksummed in software before fragmenting.
    """
    if len(frame) < 42 or struct.unpack_from('!H', frame, 12)[0] != ETH_P_IP or frame[23] != 17:
        return frame
    if struct.unpack_from('!H', frame, 20)[0] & 0x3FFF:   # MF flag or a fragment offset: a fragment
        return frame
    offset = 14 + (frame[14] & 0x0F) * 4 + 6
    if offset + 2 > len(frame):
        return frame
    fixed = bytearray(frame)
    fixed[offset:offset + 2] = b'\0\0'
    return bytes(fixed)


class Direction:
    """One direction of the link: frames read on `rx` go out on `tx` after `delay` s, or are lost."""

    def __init__(self, name, rx, tx, loss, delay, seed):
        self.name, self.rx, self.tx = name, rx, tx
        self.loss, self.delay = loss, delay
        self.random = random.Random(seed)
        self.queue = deque()
        self.ready = threading.Condition()
        self.counts = {'frames_in': 0, 'bytes_in': 0, 'frames_out': 0, 'bytes_out': 0, 'lost': 0,
                       'send_errors': 0, 'kernel_drops': 0, 'max_queue': 0}
        self.last_error = ''

    def receive(self, stop):
        """Read frames until stop is set; queue each one with its due time, or count it lost."""
        while not stop.is_set():
            try:
                frame, address = self.rx.recvfrom(MAX_FRAME)
            except socket.timeout:
                continue
            if address[2] == PACKET_OUTGOING:   # our own relayed frames: relaying them back would loop
                continue
            self.counts['frames_in'] += 1
            self.counts['bytes_in'] += len(frame)
            if self.random.random() < self.loss:
                self.counts['lost'] += 1
                continue
            with self.ready:
                self.queue.append((time.monotonic() + self.delay, frame))
                self.counts['max_queue'] = max(self.counts['max_queue'], len(self.queue))
                self.ready.notify()

    def send(self, stop):
        """Send queued frames when due until stop is set."""
        while not stop.is_set():
            with self.ready:
                if not self.queue:
                    self.ready.wait(POLL_S)
                    continue
                due, frame = self.queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.ready:
                self.queue.popleft()
            self._send(frame)

    def _send(self, frame):
        try:
            self.tx.send(clear_udp_checksum(frame))
        except OSError as err:   # ENOBUFS: the egress qdisc is full (the link is congested)
            self.counts['send_errors'] += 1
            self.last_error = str(err)
            return
        self.counts['frames_out'] += 1
        self.counts['bytes_out'] += len(frame)

    def report(self):
        """Return this direction's counters (kernel drops read now)."""
        self.counts['kernel_drops'] += kernel_drops(self.rx)
        return {**self.counts, 'last_error': self.last_error}


class Link:
    """Both directions between interfaces a and b, each with its own reader and sender thread."""

    def __init__(self, a, b, loss, delay, seed=0):
        port_a, port_b = open_port(a), open_port(b)
        self.interfaces = (a, b)
        self.directions = [Direction(f'{a}->{b}', port_a, port_b, loss, delay, seed),
                           Direction(f'{b}->{a}', port_b, port_a, loss, delay, seed + 1)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=getattr(d, step), args=(self.stop,), daemon=True)
                        for d in self.directions for step in ('receive', 'send')]
        self.settings = {'loss': loss, 'delay_s': delay, 'seed': seed}

    def start(self):
        for thread in self.threads:
            thread.start()

    def close(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=2.0)

    def report(self):
        return {**self.settings, 'directions': {d.name: d.report() for d in self.directions}}


def write_json(path, data):
    """Write JSON atomically (a reader never sees half a file)."""
    temporary = f'{path}.tmp'
    with open(temporary, 'w') as file:
        json.dump(data, file, indent=1)
    os.replace(temporary, path)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog='linkemu', description=__doc__.split('\n\n')[0])
    parser.add_argument('a', help='first interface')
    parser.add_argument('b', help='second interface')
    parser.add_argument('--loss', type=float, default=0.01, help='fraction of frames dropped, each direction')
    parser.add_argument('--delay-ms', type=float, default=5.0, help='one-way delay in milliseconds')
    parser.add_argument('--seed', type=int, default=0, help='seed of the loss draws')
    parser.add_argument('--stats', help='JSON file of counters, rewritten every second and at exit')
    return parser.parse_args(argv)


def main(argv=None):
    """Relay frames until SIGINT or SIGTERM; return the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    link = Link(args.a, args.b, args.loss, args.delay_ms / 1000.0, args.seed)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    link.start()
    print(f'linkemu: relaying {args.a} <-> {args.b}, loss {args.loss:.2%}, delay {args.delay_ms} ms',
          flush=True)
    while not done.wait(1.0):
        if args.stats:
            write_json(args.stats, link.report())
    link.close()
    if args.stats:
        write_json(args.stats, link.report())
    return 0


if __name__ == '__main__':
    sys.exit(main())
