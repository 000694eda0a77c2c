"""Object categories: random dimensions and their composition from analytic primitives.

Every object stands on its support at the origin of its own frame (z up, yaw about z). Sampling puts
all random choices into a `dims` dict so building from (category, dims) is deterministic.
"""
from dataclasses import replace

import numpy as np

from .primitives import frame_matrix, make_primitive
from .textures import COLOURS, Material

CATEGORIES = ('mug', 'bottle', 'bowl', 'box', 'ball', 'can', 'book', 'plant pot', 'cup', 'vase')

# Colours a category may take (plant pots are never green: their foliage is).
ALLOWED_COLOURS = {name: tuple(COLOURS) for name in CATEGORIES}
ALLOWED_COLOURS['plant pot'] = tuple(c for c in COLOURS if c != 'green')

# (specular strength, shininess) by category: glazed ceramics shine, paper does not.
FINISH = {'mug': (0.35, 40), 'bottle': (0.3, 30), 'bowl': (0.35, 40), 'box': (0.08, 10),
          'ball': (0.25, 25), 'can': (0.3, 30), 'book': (0.05, 10), 'plant pot': (0.1, 15),
          'cup': (0.1, 15), 'vase': (0.4, 50)}


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def _cuboid(size):
    """Dimensions of a box-shaped object of size (x, y, z): footprint radius and height."""
    return dict(size=size, footprint=0.5 * float(np.hypot(*size[:2])), height=size[2])


def sample_dims(category, rng):
    """Draw the dimensions (metres) of one object; includes 'footprint' (radius) and 'height'."""
    if category == 'mug':
        r, h = _u(rng, 0.038, 0.052), _u(rng, 0.085, 0.12)
        d = dict(radius=r, height=h, handle_radius=0.3 * h, handle_thickness=0.013, handle_width=0.008)
        d['footprint'] = r + 0.3 * h
    elif category == 'bottle':
        r = _u(rng, 0.03, 0.045)
        neck = r * _u(rng, 0.35, 0.45)
        d = dict(radius=r, body=_u(rng, 0.12, 0.19), shoulder=_u(rng, 0.025, 0.05), neck_radius=neck,
                 neck=_u(rng, 0.025, 0.05), cap=_u(rng, 0.012, 0.02),
                 cap_colour=tuple(rng.choice([(0.93, 0.93, 0.9), (0.08, 0.08, 0.08), (0.72, 0.73, 0.76)])))
        d['height'] = d['body'] + d['shoulder'] + d['neck'] + d['cap']
        d['footprint'] = r
    elif category == 'bowl':
        r = _u(rng, 0.075, 0.11)
        d = dict(radius=r, height=r * _u(rng, 0.5, 0.8), footprint=r)
    elif category == 'box':
        d = _cuboid((_u(rng, 0.07, 0.16), _u(rng, 0.07, 0.14), _u(rng, 0.05, 0.13)))
    elif category == 'ball':
        r = _u(rng, 0.04, 0.075)
        d = dict(radius=r, height=2 * r, footprint=r)
    elif category == 'can':
        r = _u(rng, 0.031, 0.04)
        d = dict(radius=r, height=_u(rng, 0.095, 0.13), band=0.008, footprint=r)
    elif category == 'book':
        d = _cuboid((_u(rng, 0.15, 0.24), _u(rng, 0.11, 0.17), _u(rng, 0.02, 0.045)))
    elif category == 'plant pot':
        rb = _u(rng, 0.035, 0.05)
        d = dict(bottom_radius=rb, top_radius=rb * _u(rng, 1.2, 1.45), pot_height=_u(rng, 0.07, 0.11))
        d['leaves'] = _sample_leaves(rng, d['top_radius'], d['pot_height'])
        d['leaf_colours'] = (tuple(rng.uniform([0.05, 0.3, 0.05], [0.2, 0.55, 0.15])),
                             tuple(rng.uniform([0.2, 0.5, 0.1], [0.45, 0.75, 0.25])))
        d['footprint'] = max(d['top_radius'], max(np.hypot(x, y) + s for x, y, _, s, _ in d['leaves']))
        d['height'] = max(z + s * q for _, _, z, s, q in d['leaves'])
    elif category == 'cup':
        rt = _u(rng, 0.038, 0.048)
        d = dict(bottom_radius=rt * _u(rng, 0.65, 0.8), top_radius=rt, height=_u(rng, 0.08, 0.115))
        d['footprint'] = rt
    elif category == 'vase':
        r, squash = _u(rng, 0.045, 0.065), _u(rng, 1.1, 1.5)
        d = dict(radius=r, squash=squash, neck_radius=r * _u(rng, 0.4, 0.55), neck=_u(rng, 0.04, 0.08),
                 flare=_u(rng, 1.1, 1.4), footprint=r)
        d['height'] = 2 * r * squash + d['neck']
    else:
        raise ValueError(f'unknown category {category!r}')
    return d


def _sample_leaves(rng, pot_radius, pot_height):
    """Sample a few overlapping leaf balls (dx, dy, dz, radius, vertical squash) above the pot."""
    leaves = []
    for i in range(int(rng.integers(2, 4))):
        radius = pot_radius * _u(rng, 0.8, 1.2) * (0.8 if i else 1.0)
        angle, spread = _u(rng, 0, 2 * np.pi), pot_radius * _u(rng, 0.0, 0.7) * (i > 0)
        z = pot_height + radius * _u(rng, 0.5, 0.9) + 0.4 * radius * (i > 0)
        leaves.append((spread * np.cos(angle), spread * np.sin(angle), z, radius, _u(rng, 0.8, 1.15)))
    return leaves


def object_material(category, colour_rgb, colour2_rgb, pattern, cell):
    """Return the base material of an object's main surface."""
    specular, shininess = FINISH[category]
    kind = {'can': 'can', 'book': 'book', 'plant pot': 'pot'}.get(category, 'object')
    return Material(kind, tuple(colour_rgb), tuple(colour2_rgb), pattern, cell, specular, shininess)


def build_object(category, dims, object_to_world, material, instance_id):
    """Compose one object from primitives in world coordinates."""
    parts = _PARTS[category](dims, material)
    return [make_primitive(kind, params, object_to_world @ local, material=mat, instance_id=instance_id)
            for kind, params, local, mat in parts]


def _frustum(r0, r1, z0, z1, top=True, bottom=True):
    # Open shells get a thick base so their inside floor never ties in depth with the support.
    return dict(r0=r0, r1=r1, z0=z0, z1=z1, top=top, bottom=bottom, floor=0.0 if top else 0.006)


def _mug_parts(d, m):
    r, h = d['radius'], d['height']
    handle = dict(r_out=d['handle_radius'], r_in=d['handle_radius'] - d['handle_thickness'],
                  half_width=d['handle_width'])
    plain = replace(m, pattern='plain')
    body = replace(m, params={'inner_shade': 0.7, 'rim': h})
    return [('frustum', _frustum(r, r, 0.0, h, top=False), np.eye(4), body),
            ('ring', handle, frame_matrix((r - 0.003, 0.0, 0.52 * h)), plain)]


def _bottle_parts(d, m):
    r, rn = d['radius'], d['neck_radius']
    z1 = d['body']
    z2 = z1 + d['shoulder']
    z3 = z2 + d['neck']
    cap = replace(m, kind='object', colour=d['cap_colour'], pattern='plain', specular=0.2)
    plain = replace(m, pattern='plain')
    return [('frustum', _frustum(r, r, 0.0, z1, top=False), np.eye(4), m),
            ('frustum', _frustum(r, rn, z1, z2, top=False, bottom=False), np.eye(4), plain),
            ('frustum', _frustum(rn, rn, z2, z3, top=False, bottom=False), np.eye(4), plain),
            ('frustum', _frustum(1.2 * rn, 1.2 * rn, z3, z3 + d['cap']), np.eye(4), cap)]


def _bowl_parts(d, m):
    r = d['radius']
    shell = dict(radius=r, z_max=d['height'] - r)
    material = replace(m, params={'inner_shade': 0.72, 'rim': shell['z_max']})
    return [('sphere', shell, frame_matrix((0.0, 0.0, r)), material)]


def _box_parts(d, m):
    half = tuple(0.5 * s for s in d['size'])
    return [('box', dict(half=half), frame_matrix((0.0, 0.0, half[2])), m)]


def _ball_parts(d, m):
    return [('sphere', dict(radius=d['radius']), frame_matrix((0.0, 0.0, d['radius'])), m)]


def _can_parts(d, m):
    r, h = d['radius'], d['height']
    material = replace(m, params=dict(z0=0.0, z1=h, band=d['band']))
    return [('frustum', _frustum(r, r, 0.0, h), np.eye(4), material)]


def _book_parts(d, m):
    half = tuple(0.5 * s for s in d['size'])
    return [('box', dict(half=half), frame_matrix((0.0, 0.0, half[2])),
             replace(m, params=dict(half=half, cover=0.003)))]


def _plant_pot_parts(d, m):
    rb, rt, h = d['bottom_radius'], d['top_radius'], d['pot_height']
    parts = [('frustum', _frustum(rb, rt, 0.0, h), np.eye(4), m)]
    green1, green2 = d['leaf_colours']
    for i, (x, y, z, radius, squash) in enumerate(d['leaves']):
        leaf = Material('foliage', green1, green2, cell=0.02, params={'offset': 37.0 * i})
        parts.append(('sphere', dict(radius=radius), frame_matrix((x, y, z), scale=(1, 1, squash)), leaf))
    return parts


def _cup_parts(d, m):
    shape = _frustum(d['bottom_radius'], d['top_radius'], 0.0, d['height'], top=False)
    return [('frustum', shape, np.eye(4), replace(m, params={'inner_shade': 0.75, 'rim': d['height']}))]


def _vase_parts(d, m):
    r, squash, rn = d['radius'], d['squash'], d['neck_radius']
    body_top = 2 * r * squash
    # The neck's floor sits inside the body: looking into the neck shows a dark bottom.
    neck = _frustum(rn, rn * d['flare'], body_top - 0.25 * r * squash, body_top + d['neck'], top=False)
    plain = replace(m, pattern='plain', params={'inner_shade': 0.45})
    return [('sphere', dict(radius=r), frame_matrix((0.0, 0.0, r * squash), scale=(1, 1, squash)), m),
            ('frustum', neck, np.eye(4), plain)]


_PARTS = {'mug': _mug_parts, 'bottle': _bottle_parts, 'bowl': _bowl_parts, 'box': _box_parts,
          'ball': _ball_parts, 'can': _can_parts, 'book': _book_parts, 'plant pot': _plant_pot_parts,
          'cup': _cup_parts, 'vase': _vase_parts}
