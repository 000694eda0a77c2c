"""ament-style lint of the package: flake8 (project line length) and pep257 through pytest."""
import os

from ament_flake8.main import main_with_errors as flake8_main
from ament_pep257.main import main as pep257_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = [os.path.join(ROOT, p) for p in ('diffseg_ros', 'launch', 'test', 'setup.py')]


def test_flake8():
    rc, errors = flake8_main(argv=['--linelength', '110', *PATHS])
    assert rc == 0, f'flake8 found {len(errors)} problem(s):\n' + '\n'.join(errors)


def test_pep257():
    # PEP 257 itself (summary on the first line); missing docstrings are flake8's and review's business
    ignore = ['D100', 'D101', 'D102', 'D103', 'D104', 'D105', 'D106', 'D107']
    assert pep257_main(argv=[*PATHS, '--convention', 'pep257', '--add-ignore', *ignore]) == 0, \
        'pep257 problems (see the output above)'
