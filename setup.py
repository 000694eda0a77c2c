"""ament_python package: builds with colcon on a robot and installs with pip into a venv."""
from glob import glob
import os

from setuptools import find_packages, setup

PACKAGE = 'diffseg_ros'


def package_files(root):
    """List the files of a package-data folder relative to the package (for the embedded models)."""
    found = []
    for folder, _, files in os.walk(os.path.join(PACKAGE, root)):
        found += [os.path.relpath(os.path.join(folder, f), PACKAGE) for f in files]
    return found


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'test.*']),
    package_data={PACKAGE: package_files('embedded')},
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', glob('config/*')),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='diffseg_ros maintainers',
    maintainer_email='maintainers@diffseg-ros.org',
    description='Open-vocabulary segmentation from diffusion-model attention for ROS 2.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'diffseg_node = diffseg_ros.node:main',
            'synth_camera = diffseg_ros.ros.synth_camera:main',
            'ldmseg_node = diffseg_ros.ros.ldmseg_node:main',
            'diffseg = diffseg_ros.tools.cli:main',
        ],
    },
)
