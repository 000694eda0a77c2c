"""Segmentation methods, one short module per paper: cross (baseline), stableseg, t2m, iosd (learned head)."""
from . import cross, iosd, stableseg, t2m

METHODS = {'cross': cross, 'stableseg': stableseg, 't2m': t2m, 'iosd': iosd}
