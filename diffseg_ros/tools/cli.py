"""`diffseg`: one command with verbs (bench, synth, train, eval, demo, concept, bag, offboard); `-h` each."""
import argparse
import importlib
import sys

from ..core.model_folder import quiet_model_libraries

# verb -> module with add_parser(subparsers); imported lazily so `--help` stays fast
VERBS = {
    'bench': 'diffseg_ros.tools.bench',
    'synth': 'diffseg_ros.tools.synth_cli',
    'train': 'diffseg_ros.tools.train_cli',
    'eval': 'diffseg_ros.tools.evaluate',
    'demo': 'diffseg_ros.tools.demo',
    'concept': 'diffseg_ros.tools.concept_cli',
    'bag': 'diffseg_ros.tools.bag',
    'offboard': 'diffseg_ros.tools.offboard',
}


def build_parser(verbs=VERBS):
    parser = argparse.ArgumentParser(prog='diffseg', description=__doc__)
    subparsers = parser.add_subparsers(dest='verb', required=True, metavar='VERB')
    for module in verbs.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    quiet_model_libraries()
    verb = next((a for a in argv if not a.startswith('-')), None)
    verbs = {verb: VERBS[verb]} if verb in VERBS else VERBS
    parser = build_parser(verbs)
    if argv[:2] == ['synth', 'camera']:          # everything after it belongs to ROS (--ros-args ...)
        args = parser.parse_args(argv[:2])
        args.ros_args = argv[2:]
    else:
        args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == '__main__':
    sys.exit(main())
