"""The parameter files in config/, generated from the nodes' settings (one home for every setting).

    python -m diffseg_ros.ros.config_files           # rewrite config/diffseg.yaml and config/ldmseg.yaml
    python -m diffseg_ros.ros.config_files --check   # exit 1 if a committed file differs from its settings
A test runs the check, so a setting changed in code without regenerating its file fails the suite.
"""
import argparse
import os
import sys

from ..core.settings import yaml_text
from . import ldmseg_node, segmentation_node

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          'config')
HEADER = """Parameters of the {name} node ({command} --ros-args --params-file config/{name}.yaml).
Generated from the node's settings by `python -m diffseg_ros.ros.config_files`: edit the settings, then
regenerate. Read-only parameters are fixed at start; the ones marked "Runtime" can be changed with
`ros2 param set /{name} <name> <value>`. Floats must be written with a decimal point (0.5, not 0).
An empty list ([]) means "use the default" (ROS leaves such a parameter unset)."""
FILES = {
    'diffseg.yaml': (segmentation_node.NODE_NAME, segmentation_node.NodeSettings,
                     'python -m diffseg_ros.node'),
    'ldmseg.yaml': (ldmseg_node.NODE_NAME, ldmseg_node.NodeSettings,
                    'python -m diffseg_ros.ros.ldmseg_node'),
}


def generated():
    """{file name: text} of every parameter file as the settings declare it."""
    return {file: yaml_text(name, settings, HEADER.format(name=name, command=command))
            for file, (name, settings, command) in FILES.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true', help='compare instead of writing')
    args = parser.parse_args(argv)
    stale = []
    for file, text in generated().items():
        path = os.path.join(CONFIG_DIR, file)
        if args.check:
            with open(path, encoding='utf-8') as f:
                if f.read() != text:
                    stale.append(path)
        else:
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
    for path in stale:
        print(f'{path} differs from the settings; run python -m diffseg_ros.ros.config_files',
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == '__main__':
    sys.exit(main())
