"""Segmentation methods, one short module per paper: cross (baseline), stableseg, t2m."""
from . import cross, stableseg, t2m

METHODS = {'cross': cross, 'stableseg': stableseg, 't2m': t2m}
