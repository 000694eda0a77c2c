"""Two hosts on one machine: robot and GPU-host network namespaces joined through a link namespace.

    robot ns                 link ns                          gpu ns
    [robot_if] ==veth== [link_robot]  linkemu  [link_gpu] ==veth== [gpu_if]
    10.231.21.1/24           (no addresses)                    10.231.21.2/24

Each endpoint's egress is shaped by a kernel tbf qdisc (the rate of the robot's radio; a full queue holds
the sender back, as a NIC does); loss and delay come from the user-space relay in the link namespace
(tools/linkemu.py), because this kernel has no netem. Names carry a tag (the pid) so concurrent runs
never meet, addresses are private and live only inside the namespaces, IPv6 is off (no router
solicitations on the link). Needs root (CAP_NET_ADMIN). `close()` deletes the namespaces, which deletes
their veths and qdiscs.

Each host namespace also gets its own /etc/machine-id (`ip netns exec` bind-mounts the files of
/etc/netns/<name>/ over /etc). Fast DDS derives its host id from the machine id: with the machine's one
shared, both sides believe they run on one host and accept only the peer locators their own interface
allowlist names, so nothing matches; with two ids they behave as two computers do.
"""
import json
import os
import re
import shutil
import subprocess
import uuid

SUBNET = '10.231.21'
ROBOT_IP, GPU_IP = f'{SUBNET}.1', f'{SUBNET}.2'
PREFIX = 'dsr'   # namespace and interface names: dsr<pid><role>
NETNS_ETC = '/etc/netns'


def run(*command):
    """Run a command; raise RuntimeError with its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces():
    """Return the names of the machine's named network namespaces."""
    return [line.split()[0] for line in run('ip', 'netns', 'list').splitlines() if line.strip()]


def remove_stale():
    """Delete namespaces this module made in runs whose process is gone (a killed test); return them."""
    stale = [name for name in namespaces()
             if (match := re.fullmatch(rf'{PREFIX}(\d+)[rgl]', name)) and not pid_alive(int(match[1]))]
    for name in stale:
        subprocess.run(['ip', 'netns', 'del', name], capture_output=True)
        remove_etc(name)
    return stale


def remove_etc(namespace):
    """Remove a namespace's /etc/netns/<name>/ folder, and /etc/netns itself when it is left empty."""
    shutil.rmtree(os.path.join(NETNS_ETC, namespace), ignore_errors=True)
    try:
        os.rmdir(NETNS_ETC)
    except OSError:   # other namespaces' files are there, or it never existed
        pass


class Testbed:
    """The three namespaces and two veth pairs; create() builds them, close() removes them."""

    def __init__(self, rate='50mbit', tag=None):
        tag = str(os.getpid() if tag is None else tag)
        self.rate = rate
        self.ns = {role: f'{PREFIX}{tag}{role[0]}' for role in ('robot', 'gpu', 'link')}
        self.interfaces = {'robot': f'{PREFIX}{tag}r0', 'gpu': f'{PREFIX}{tag}g0',
                           'link_robot': f'{PREFIX}{tag}lr', 'link_gpu': f'{PREFIX}{tag}lg'}
        assert all(len(name) <= 15 for name in self.interfaces.values())   # IFNAMSIZ - 1
        self.ips = {'robot': ROBOT_IP, 'gpu': GPU_IP}
        self.created = []

    def create(self):
        """Build the namespaces, veths, addresses and qdiscs; on failure remove what was built and raise."""
        try:
            for namespace in self.ns.values():
                run('ip', 'netns', 'add', namespace)
                self.created.append(namespace)
                self.exec_run(namespace, 'sysctl', '-q', '-w', 'net.ipv6.conf.all.disable_ipv6=1',
                              'net.ipv6.conf.default.disable_ipv6=1')
                run('ip', '-n', namespace, 'link', 'set', 'lo', 'up')
            for host in ('robot', 'gpu'):
                self._machine_id(self.ns[host])
            for host in ('robot', 'gpu'):
                self._connect(host)
        except Exception:
            self.close()
            raise

    def _machine_id(self, namespace):
        folder = os.path.join(NETNS_ETC, namespace)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'machine-id'), 'w') as file:
            file.write(uuid.uuid4().hex + '\n')

    def _connect(self, host):
        """Join a host namespace to the link namespace by a veth pair; address, bring up and shape it."""
        inner, outer = self.interfaces[host], self.interfaces[f'link_{host}']
        run('ip', '-n', self.ns['link'], 'link', 'add', outer, 'type', 'veth', 'peer', 'name', inner,
            'netns', self.ns[host])
        run('ip', '-n', self.ns[host], 'addr', 'add', f'{self.ips[host]}/24', 'dev', inner)
        run('ip', '-n', self.ns[host], 'link', 'set', inner, 'up')
        run('ip', '-n', self.ns['link'], 'link', 'set', outer, 'up')
        # burst: at least one timer tick of data at the rate; latency: the queue a radio would hold
        run('tc', '-n', self.ns[host], 'qdisc', 'add', 'dev', inner, 'root', 'tbf', 'rate', self.rate,
            'burst', '32kb', 'latency', '100ms')

    def exec_run(self, namespace, *command):
        return run('ip', 'netns', 'exec', namespace, *command)

    def prefix(self, role):
        """Return the command prefix that runs a program inside a role's namespace."""
        return ['ip', 'netns', 'exec', self.ns[role]]

    def counters(self, role, interface=None):
        """Return {'tx_bytes', 'tx_packets', 'rx_bytes', 'rx_packets'} of a role's interface."""
        interface = interface or self.interfaces[role]
        stats = json.loads(run('ip', '-n', self.ns[role], '-j', '-s', 'link', 'show', 'dev', interface))
        stats = stats[0]['stats64']
        return {f'{way}_{unit}': stats[way][unit] for way in ('tx', 'rx') for unit in ('bytes', 'packets')}

    def qdisc(self, role):
        """Return the tbf statistics of a host's egress (sent, dropped, overlimits)."""
        found = json.loads(run('tc', '-n', self.ns[role], '-j', '-s', 'qdisc', 'show', 'dev',
                               self.interfaces[role]))
        tbf = next((q for q in found if q.get('kind') == 'tbf'), {})
        return {key: tbf.get(key) for key in ('bytes', 'packets', 'drops', 'overlimits')}

    def close(self):
        """Delete the namespaces made (their veths and qdiscs go with them); never raise."""
        for namespace in reversed(self.created):
            subprocess.run(['ip', 'netns', 'del', namespace], capture_output=True)
            remove_etc(namespace)
        self.created = []

    def __enter__(self):
        self.create()
        return self

    def __exit__(self, *exc):
        self.close()
