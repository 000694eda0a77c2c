"""Seen / unseen splits of SynthWorld for learned heads (issue 20), defined once for training and evaluation.

A learned head is trained on SynthWorld scenes whose every object is of a seen category and of a seen
colour-pattern combination; evaluation reports seen and unseen categories (and the held-out colour-pattern
combinations of seen categories) separately. The split plays the role of IOSD's class splits (IOSD §4.1).

Seeds: the base model was trained on scenes 0 .. 19,999; heads train on seeds from HEAD_TRAIN_SEED; hyper-
parameters are chosen on validation seeds from VALIDATION_SEED; `diffseg eval` uses seeds from 10^9.
"""
from .objects import CATEGORIES
from .textures import COLOURS

# Three of the ten categories never reach a head's training set: a cylinder with look-alikes among the seen
# categories (can: mug, cup), a tall vessel (vase: bottle) and a shape none of the seen categories has (ball).
UNSEEN_CATEGORIES = ('ball', 'can', 'vase')
SEEN_CATEGORIES = tuple(c for c in CATEGORIES if c not in UNSEEN_CATEGORIES)
# Colour-pattern combinations never shown to a head (any category): the phrase never names a pattern, so
# these test whether the head reads colour through an unfamiliar surface.
UNSEEN_COMBOS = (('red', 'striped'), ('blue', 'dotted'), ('yellow', 'checkered'), ('white', 'striped'))

HEAD_TRAIN_SEED = 20_000          # first training scene seed of a head (the base model used 0 .. 19,999)
VALIDATION_SEED = 3_000_000_000   # hyper-parameters are chosen on scenes from here
EVAL_SEED = 1_000_000_000         # `diffseg eval` (held-out; never used to choose anything)


def object_split(category, colour=None, pattern=None):
    """Return 'unseen' (held-out category), 'combo' (held-out colour-pattern combination) or 'seen'."""
    if category in UNSEEN_CATEGORIES:
        return 'unseen'
    if (colour, pattern) in UNSEEN_COMBOS:
        return 'combo'
    return 'seen'


def trainable_object(obj):
    """Tell whether an object (ObjectInfo) may be shown to a head: seen category and seen colour-pattern."""
    return object_split(obj.category, obj.colour, obj.pattern) == 'seen'


def trainable_scene(scene_or_spec):
    """Tell whether every object of the world (visible or not: nothing held out in any pixel) is trainable."""
    spec = getattr(scene_or_spec, 'spec', None) or scene_or_spec
    return all(trainable_object(o) for o in spec.objects)


def seen_phrases():
    """Every 'colour category' phrase a head may be trained on (negatives are drawn from these)."""
    return [(colour, category) for category in SEEN_CATEGORIES for colour in COLOURS
            if not (category == 'plant pot' and colour == 'green')]


def all_phrases():
    """Every 'colour category' phrase of SynthWorld (absent-object queries in evaluation)."""
    return [(colour, category) for category in CATEGORIES for colour in COLOURS
            if not (category == 'plant pot' and colour == 'green')]
