"""Named colours, surface patterns and procedural textures (wood, tiles, paint, foliage, soil).

Albedo functions take pattern coordinates in cells (furniture: cell = 1 m) and return linear RGB in
[0, 1] plus a per-pixel specular strength.
"""
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

from .primitives import BOTTOM, FACE_X, FACE_Y, INNER, TOP

COLOURS = {
    'red': (0.80, 0.08, 0.07), 'green': (0.13, 0.60, 0.16), 'blue': (0.10, 0.25, 0.82),
    'yellow': (0.96, 0.84, 0.08), 'orange': (0.97, 0.47, 0.05), 'purple': (0.48, 0.16, 0.66),
    'white': (0.93, 0.93, 0.91), 'black': (0.07, 0.07, 0.08), 'pink': (0.97, 0.52, 0.70),
    'brown': (0.45, 0.25, 0.10),
}
PATTERNS = ('plain', 'striped', 'dotted', 'checkered')

METAL = np.array([0.6, 0.61, 0.64])
SOIL = np.array([0.26, 0.16, 0.09])
PAGES = np.array([0.93, 0.90, 0.80])

# Furniture palettes: (name, colour, second colour) -- the second is the alternate tile colour.
WOODS = {'oak': (0.66, 0.46, 0.26), 'walnut': (0.38, 0.23, 0.13), 'pine': (0.80, 0.64, 0.40),
         'cherry': (0.58, 0.29, 0.16), 'ash': (0.78, 0.72, 0.62), 'smoked': (0.48, 0.40, 0.34)}
PAINTS_TABLE = {'white': (0.88, 0.88, 0.86), 'light grey': (0.66, 0.67, 0.68),
                'dark grey': (0.30, 0.31, 0.33), 'mint': (0.62, 0.78, 0.70)}
PAINTS_WALL = {'cream': (0.90, 0.86, 0.76), 'light grey': (0.78, 0.79, 0.80),
               'sky': (0.68, 0.78, 0.88), 'sage': (0.66, 0.74, 0.62), 'peach': (0.92, 0.76, 0.64),
               'white': (0.92, 0.92, 0.90), 'mauve': (0.74, 0.66, 0.74)}
TILES = {'white': ((0.90, 0.90, 0.88), (0.82, 0.83, 0.84)),
         'checker': ((0.88, 0.88, 0.86), (0.18, 0.18, 0.20)),
         'terracotta': ((0.70, 0.38, 0.24), (0.62, 0.33, 0.21)),
         'slate': ((0.32, 0.34, 0.37), (0.27, 0.28, 0.31)),
         'beige': ((0.82, 0.74, 0.60), (0.76, 0.68, 0.55))}
CARPETS = {'grey': (0.45, 0.46, 0.48), 'blue': (0.30, 0.36, 0.52), 'beige': (0.70, 0.64, 0.54)}


@dataclass
class Material:
    """How a surface is coloured: `kind` selects the albedo function; the rest are its inputs."""

    kind: str = 'object'
    colour: tuple = (0.5, 0.5, 0.5)
    colour2: tuple = (1.0, 1.0, 1.0)
    pattern: str = 'plain'
    cell: float = 0.02              # metres per pattern cell (1.0 for furniture)
    specular: float = 0.0
    shininess: float = 20.0
    params: dict = field(default_factory=dict)


def second_colour(colour):
    """Pattern colour that contrasts with `colour`: white on dark colours, a dark shade on light ones."""
    colour = np.asarray(colour)
    luminance = colour @ np.array([0.3, 0.55, 0.15])
    return (0.95, 0.95, 0.93) if luminance < 0.55 else tuple(0.35 * colour)


@lru_cache(maxsize=1)
def _noise_table(size=256):
    """Build a fixed tileable smooth noise texture in [0, 1] (shared; materials vary where they sample it)."""
    rng = np.random.default_rng(20240601)
    coarse = gaussian_filter(rng.random((size, size)), 6.0, mode='wrap')
    fine = gaussian_filter(rng.random((size, size)), 1.5, mode='wrap')
    table = coarse / coarse.std() + 0.5 * fine / fine.std()
    return ((table - table.min()) / np.ptp(table)).astype(np.float32)


def noise(u, v):
    """Sample the noise table (period 256 in u and v) at the nearest texel."""
    table = _noise_table()
    size = table.shape[0]
    return table[np.floor(v).astype(np.int64) % size, np.floor(u).astype(np.int64) % size]


def _hash(x):
    """Cheap deterministic pseudo-random value in [0, 1) per (integer) input."""
    return np.modf(np.abs(np.sin(x * 12.9898 + 78.233) * 43758.5453))[0]


def pattern_mask(pattern, uv):
    """Return where the second colour of a pattern shows, from coordinates in cells."""
    u, v = uv[:, 0], uv[:, 1]
    if pattern == 'striped':
        return v % 1.0 < 0.45
    if pattern == 'dotted':
        row = np.floor(v)
        du = (u + 0.5 * (row % 2)) % 1.0 - 0.5
        dv = v - row - 0.5
        return du * du + dv * dv < 0.31 ** 2
    if pattern == 'checkered':
        return (np.floor(u) + np.floor(v)) % 2 == 1
    return np.zeros(len(u), bool)


def _patterned(m, uv):
    return np.where(pattern_mask(m.pattern, uv)[:, None], np.asarray(m.colour2), np.asarray(m.colour))


def _object(m, uv, codes, p):
    # Inside of open shells and their floors: plain and darker (less light gets in).
    rgb = _patterned(m, uv)
    inside = (codes == INNER) | (codes == BOTTOM)
    rgb[inside] = np.asarray(m.colour) * m.params.get('inner_shade', 0.8)
    if 'rim' in m.params:
        # A darker line along the rim of open shells makes the opening readable at low resolution.
        rgb[p[:, 2] > m.params['rim'] - 0.003] *= 0.7
    return rgb, np.full(len(uv), m.specular)


def _can(m, uv, codes, p):
    # Painted middle, bare metal rims and lid.
    rgb = _patterned(m, uv)
    z0, z1, band = m.params['z0'], m.params['z1'], m.params['band']
    metal = (codes == TOP) | (codes == BOTTOM) | (p[:, 2] < z0 + band) | (p[:, 2] > z1 - band)
    rgb[metal] = METAL * (0.85 + 0.3 * noise(uv[metal, 0] * 9, uv[metal, 1] * 9)[:, None])
    return rgb, np.where(metal, 0.45, m.specular)


def _book(m, uv, codes, p):
    # Covers on top, bottom and spine (-x); page block on the three other sides.
    rgb = _patterned(m, uv)
    hz, cover = m.params['half'][2], m.params['cover']
    side = ((codes == FACE_X) & (p[:, 0] > 0)) | (codes == FACE_Y)
    pages = side & (np.abs(p[:, 2]) < hz - cover)
    rgb[pages] = PAGES * (0.9 + 0.1 * np.cos(p[pages, 2] * 2 * np.pi / 0.004))[:, None]
    spine = (codes == FACE_X) & (p[:, 0] < 0)
    rgb[spine] = np.asarray(m.colour) * 0.85
    return rgb, np.where(pages, 0.0, m.specular)


def _pot(m, uv, codes, p):
    # Terracotta-like pot whose top is soil.
    rgb = _patterned(m, uv)
    soil = (codes == TOP) | (codes == INNER)
    rgb[soil] = SOIL * (0.6 + 0.7 * noise(uv[soil, 0] * 23, uv[soil, 1] * 23))[:, None]
    return rgb, np.where(soil, 0.0, m.specular)


def _foliage(m, uv, codes, p):
    # Leafy blotches: two greens mixed by fine noise.
    mix = noise(uv[:, 0] * 17 + m.params.get('offset', 0), uv[:, 1] * 17)[:, None]
    rgb = np.asarray(m.colour) * (1 - mix) + np.asarray(m.colour2) * mix
    rgb *= 0.55 + 0.6 * noise(uv[:, 0] * 41, uv[:, 1] * 41)[:, None]
    return rgb, np.zeros(len(uv))


def _wood(m, uv, codes, p):
    # Planks along u; grain rings across them, warped by noise; dark seams between planks.
    u, v = uv[:, 0], uv[:, 1]
    width, offset = m.params['plank'], m.params['offset']
    plank = np.floor(v / width)
    tint = 1 + m.params.get('tint', 0.15) * (_hash(plank + offset) - 0.5)
    warp = noise(u * 20 + 97 * _hash(plank * 3.1 + offset), v * 160)
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (v * m.params['grain'] + 4 * warp))
    shade = tint * (0.84 + 0.16 * grain) * (0.94 + 0.12 * noise(u * 8, v * 8 + offset))
    shade = np.where((v / width) % 1.0 < 0.03, 0.55 * shade, shade)
    return np.asarray(m.colour) * shade[:, None], np.full(len(u), m.specular)


def _tiles(m, uv, codes, p):
    # Square tiles with grout, optional two-colour checker and a little per-tile variation.
    size, grout = m.params['size'], m.params['grout']
    i, j = np.floor(uv[:, 0] / size), np.floor(uv[:, 1] / size)
    fu, fv = uv[:, 0] / size - i, uv[:, 1] / size - j
    alternate = ((i + j) % 2 == 1)[:, None]
    rgb = np.where(alternate, np.asarray(m.colour2), np.asarray(m.colour))
    rgb = rgb * (0.95 + 0.1 * _hash(i * 7.13 + j * 3.71))[:, None]
    lines = (fu < grout / size) | (fv < grout / size)
    rgb[lines] = m.params.get('grout_colour', (0.55, 0.55, 0.53))
    return rgb, np.where(lines, 0.0, m.specular)


def _paint(m, uv, codes, p):
    shade = 0.95 + 0.08 * noise(uv[:, 0] * 30, uv[:, 1] * 30)
    return np.asarray(m.colour) * shade[:, None], np.full(len(uv), m.specular)


_ALBEDO = {'object': _object, 'can': _can, 'book': _book, 'pot': _pot, 'foliage': _foliage,
           'wood': _wood, 'tiles': _tiles, 'paint': _paint}


def albedo(material, uv, codes, p_local):
    """Return (rgb (N, 3), specular (N,)) of a material at pattern coordinates uv and local points."""
    return _ALBEDO[material.kind](material, uv, codes, p_local)


def mean_colour(material):
    """Approximate average albedo of a material (to keep objects distinct from their support)."""
    colour = np.asarray(material.colour)
    if material.kind == 'tiles':
        colour = (colour + np.asarray(material.colour2)) / 2
    return colour
