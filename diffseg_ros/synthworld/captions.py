"""Captions from a small vocabulary that name every visible object by colour and category."""
import re

from .objects import CATEGORIES
from .textures import COLOURS

PATTERN_ADJECTIVES = {'striped': 'striped', 'dotted': 'dotted', 'checkered': 'checkered'}
PATTERN_NOUNS = {'striped': 'stripes', 'dotted': 'dots', 'checkered': 'checks'}
SURFACE_WORDS = {'wood': 'wooden', 'paint': 'painted', 'tiles': 'tiled', 'carpet': 'carpeted'}

TABLE_TEMPLATES = ('a photo of {items}.', 'a photo of {items} on a {surface} table.',
                   '{items} on a {surface} table.', 'a {surface} table with {items}.',
                   'a table with {items}.', '{items}.', 'a picture of {items} on the table.')
FLOOR_TEMPLATES = ('a photo of {items}.', 'a photo of {items} on the floor.', '{items} on a {surface} floor.',
                   'a {surface} floor with {items}.', '{items}.', 'a picture of {items} on the floor.')

_FIXED_WORDS = 'a an of on the with and photo picture table floor'.split()
VOCABULARY = frozenset(_FIXED_WORDS + list(COLOURS) + [w for c in CATEGORIES for w in c.split()]
                       + list(PATTERN_ADJECTIVES.values()) + list(PATTERN_NOUNS.values())
                       + list(SURFACE_WORDS.values()))


def phrase(colour, category):
    """Return the query phrase of an object, e.g. 'red mug'."""
    return f'{colour} {category}'


def _article(word):
    return 'an' if word[0] in 'aeiou' else 'a'


def noun_phrase(obj, rng, pattern_probability=0.5):
    """Return 'a red mug', sometimes with its pattern: 'a red striped mug' or 'a red mug with stripes'."""
    words = phrase(obj.colour, obj.category)
    if obj.pattern != 'plain' and rng.random() < pattern_probability:
        if rng.random() < 0.5:
            words = f'{obj.colour} {PATTERN_ADJECTIVES[obj.pattern]} {obj.category}'
        else:
            words = f'{words} with {PATTERN_NOUNS[obj.pattern]}'
    return f'{_article(words)} {words}'


def join_items(items, rng):
    """Join noun phrases as an English list, with or without the serial comma."""
    if len(items) == 1:
        return items[0]
    serial = ',' if len(items) > 2 and rng.random() < 0.5 else ''
    return ', '.join(items[:-1]) + f'{serial} and {items[-1]}'


def make_caption(objects, setting, surface_kind, rng, pattern_probability=0.5):
    """Caption naming every object (in random order) with one of several phrasings.

    `setting` is 'table' or 'floor'; `surface_kind` the support texture ('wood', 'tiles', ...);
    a patterned object's pattern is named with `pattern_probability`.
    """
    if not objects:
        return f'a photo of the {setting}.'
    order = rng.permutation(len(objects))
    items = join_items([noun_phrase(objects[i], rng, pattern_probability) for i in order], rng)
    templates = TABLE_TEMPLATES if setting == 'table' else FLOOR_TEMPLATES
    template = templates[rng.integers(len(templates))]
    return template.format(items=items, surface=SURFACE_WORDS.get(surface_kind, 'wooden'))


def caption_words(caption):
    """Lower-case words of a caption without punctuation."""
    return re.findall(r'[a-z]+', caption.lower())


def parse_caption(caption):
    """Return the (colour, category) pairs a caption mentions, in order of appearance."""
    words = caption_words(caption)
    found = []
    for i, word in enumerate(words):
        if word not in COLOURS:
            continue
        rest = words[i + 1:]
        if rest and rest[0] in PATTERN_ADJECTIVES.values():
            rest = rest[1:]
        for category in sorted(CATEGORIES, key=lambda c: -len(c.split())):
            n = len(category.split())
            if ' '.join(rest[:n]) == category:
                found.append((word, category))
                break
    return found
