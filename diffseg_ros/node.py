"""Entry point of the diffseg node: `python -m diffseg_ros.node --ros-args ...` or `diffseg_node`."""
import sys

from diffseg_ros.ros.segmentation_node import main as run_node


def main():
    """Start the segmentation node; return its exit code (console scripts pass it to sys.exit)."""
    return run_node(sys.argv)


if __name__ == '__main__':
    sys.exit(main())
