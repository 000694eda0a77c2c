"""package.xml and setup.py: real rosdep keys only, every imported ROS package declared, no dead entries.

An unknown key makes `rosdep install` fail on the robot, an undeclared ROS package makes the node fail
at import there; neither shows up in this venv, where everything comes from pip.
"""
import ast
import os
from pathlib import Path
import re
import sys
import xml.etree.ElementTree as ElementTree

REPO = Path(__file__).resolve().parents[1]
ROS_PACKAGES_NOT_IN_THE_VENV = {'launch', 'launch_ros'}   # no wheels (REFERENCE.md section 7)
# Keys checked in rosdistro's rosdep/python.yaml (python3-torch: REFERENCE.md section 10). There is no key
# for diffusers, safetensors, rosbags or pydensecrf2: python3-diffusers-pip and python3-safetensors-pip
# do not exist and make `rosdep install` fail.
ROSDEP_KEYS = {'python3-numpy', 'python3-scipy', 'python3-opencv', 'python3-sklearn', 'python3-tqdm',
               'python3-matplotlib', 'python3-jsonschema', 'python3-torch', 'python3-transformers-pip',
               'python3-pytest', 'python3-yaml'}
ROSDEP_KEY_OF_MODULE = {'numpy': 'python3-numpy', 'scipy': 'python3-scipy', 'cv2': 'python3-opencv',
                        'sklearn': 'python3-sklearn', 'tqdm': 'python3-tqdm',
                        'matplotlib': 'python3-matplotlib',
                        'jsonschema': 'python3-jsonschema', 'torch': 'python3-torch',
                        'transformers': 'python3-transformers-pip', 'yaml': 'python3-yaml'}
PIP_ONLY = {'diffusers', 'safetensors', 'rosbags', 'pydensecrf'}   # named in the README's robot section
IMPLIED = {'lifecycle_msgs'}   # the nodes are rclpy.lifecycle nodes, whose services are lifecycle_msgs


def depends(kinds=('depend', 'exec_depend', 'build_depend', 'test_depend')):
    root = ElementTree.parse(REPO / 'package.xml').getroot()
    return {element.text.strip() for kind in kinds for element in root.iter(kind)}


def is_ros_package(name):
    """Tell whether a name is a ROS package: registered in an ament index, or one of launch/launch_ros."""
    prefixes = os.environ.get('AMENT_PREFIX_PATH', sys.prefix).split(os.pathsep) + [sys.prefix]
    registered = any((Path(prefix) / 'share/ament_index/resource_index/packages' / name).exists()
                     for prefix in prefixes)
    return registered or name in ROS_PACKAGES_NOT_IN_THE_VENV


def imported_modules():
    """Top-level names of every module imported by the installed code (package and launch files)."""
    names = set()
    for file in [*(REPO / 'diffseg_ros').rglob('*.py'), *(REPO / 'launch').glob('*.py')]:
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split('.')[0])
    return names - {'diffseg_ros'} - set(sys.stdlib_module_names)


def test_every_key_is_a_ros_package_or_a_known_rosdep_key():
    unknown = {key for key in depends() if not is_ros_package(key) and key not in ROSDEP_KEYS
               and not key.startswith('ament_')}
    assert not unknown, f'not rosdep keys: {sorted(unknown)}'


def test_every_imported_ros_package_is_declared():
    ros = {name for name in imported_modules() if is_ros_package(name)} | IMPLIED
    assert ros >= {'rclpy', 'sensor_msgs', 'launch_ros'}, ros   # the scan sees the imports
    missing = ros - depends(('depend', 'exec_depend'))
    assert not missing, f'imported but not in package.xml: {sorted(missing)}'


def test_every_python_dependency_is_declared_or_documented_as_pip_only():
    third_party = {name for name in imported_modules() if not is_ros_package(name)}
    undeclared = third_party - set(ROSDEP_KEY_OF_MODULE) - PIP_ONLY
    assert not undeclared, f'imports with no rosdep key and no pip note: {sorted(undeclared)}'
    missing = {ROSDEP_KEY_OF_MODULE[name] for name in third_party & set(ROSDEP_KEY_OF_MODULE)} - depends()
    assert not missing, f'rosdep keys missing from package.xml: {sorted(missing)}'
    robot = re.split(r'\n##+ ', REPO.joinpath('README.md').read_text().split('### On a robot')[1])[0]
    assert all(name in robot for name in PIP_ONLY), 'the README robot section must name the pip-only packages'


def setup_call():
    tree = ast.parse((REPO / 'setup.py').read_text())
    return next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, 'id', '') == 'setup')


def test_setup_has_no_obsolete_or_dead_entries():
    keywords = {kw.arg: kw.value for kw in setup_call().keywords}
    assert 'tests_require' not in keywords
    patterns = [node.value for node in ast.walk(keywords['package_data'])
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and '*' in node.value]
    for pattern in patterns:
        assert list((REPO / 'diffseg_ros').glob(pattern)), f'package_data pattern {pattern!r} matches nothing'


def test_maintainer_email_is_one_catkin_pkg_accepts():
    email = ElementTree.parse(REPO / 'package.xml').getroot().find('maintainer').get('email')
    assert re.fullmatch(r'[\w.+-]+@[\w-]+(\.[\w-]+)*\.[a-z]{2,}', email), email
