"""The architecture's layers, enforced (each check imports in a fresh interpreter).

The core library, SynthWorld and LDMSeg never import ROS or training code; the ROS layer never imports
training code.
"""
import json
import subprocess
import sys

import pytest

PROBE = """
import importlib, json, pkgutil, sys
for package in {packages}:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + '.'):
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def imported_by(*packages):
    """Every module a fresh interpreter holds after importing all modules of the packages."""
    code = PROBE.format(packages=list(packages))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize('packages, forbidden', [
    (('diffseg_ros.core', 'diffseg_ros.synthworld', 'diffseg_ros.ldmseg'),
     ('rclpy', 'diffseg_ros.ros', 'diffseg_ros.training', 'diffseg_ros.tools')),
    (('diffseg_ros.ros',), ('diffseg_ros.training', 'diffseg_ros.tools')),
])
def test_layers_import_only_what_is_below_them(packages, forbidden):
    modules = imported_by(*packages)
    assert any(m.startswith(packages[0] + '.') for m in modules)            # the probe did import them
    bad = [m for m in modules if any(m == f or m.startswith(f + '.') for f in forbidden)]
    assert not bad, f'{packages} imported {bad[:5]}'
