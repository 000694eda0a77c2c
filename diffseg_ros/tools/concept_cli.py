"""`diffseg concept VERB`: personal concepts (Custom Diffusion) -- learn one from images, list a directory.

  diffseg concept learn --images DIR --name "my mug" --class-word mug --out CONCEPTS_DIR
  diffseg concept list --dir CONCEPTS_DIR [--model PATH]
The concept goes to CONCEPTS_DIR/<sanitised name>/ (the folder the node's `concepts_dir` points at).
"""
import os
import sys

import cv2

from ..core.concept_learning import LearnSettings, learn_concept
from ..core.concepts import ConceptError, load_concepts, next_free_token, save_concept
from ..core.personal_fused import extract_prototypes, FusedPersonalSegmenter
from ..core.sd_models import load_sd_components
from ..core.segmenter import Segmenter, SegmenterConfig
from ..core.settings import add_arguments, from_arguments


def read_images(folder):
    """RGB uint8 images (png/jpg/bmp) of a folder, sorted by name."""
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(('.png', '.jpg', '.jpeg', '.bmp')))
    images = []
    for name in names:
        bgr = cv2.imread(os.path.join(folder, name), cv2.IMREAD_COLOR)
        if bgr is not None:
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return images


def learn_main(args):
    images = read_images(args.images)
    if not images:
        print(f'no images (png/jpg/bmp) in {args.images}', file=sys.stderr)
        return 2
    class_images = class_captions = None
    if args.class_images:
        class_images = read_images(args.class_images)
        class_captions = [f'photo of a {args.class_word}'] * len(class_images)
    settings = from_arguments(LearnSettings, args)
    sd = load_sd_components(args.model, args.device, args.dtype)
    try:
        concept = learn_concept(sd, images, args.name, args.class_word, None, aliases=args.alias,
                                class_images=class_images, class_captions=class_captions, settings=settings,
                                token=next_free_token(args.out, args.name))
        config = SegmenterConfig(model_path=args.model, device=args.device, dtype=args.dtype)
        fused = FusedPersonalSegmenter(Segmenter(config, components=sd, instances=True))
        concept.appearance = extract_prototypes(fused, images, args.class_word)   # the object's own masks
        save_concept(concept, args.out)
    except ConceptError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    t = concept.training
    views = concept.appearance.info.get('views_used', 0) if concept.appearance else 0
    print(f'learned {concept.name!r} as "{concept.phrase}" from {len(images)} images in {t["seconds"]:.1f} s '
          f'(loss {t["loss_first"]:.4f} -> {t["loss_last"]:.4f}), appearance from {views} views; saved to '
          f'{concept.folder}')
    return 0


def list_main(args):
    fingerprint = None if args.model is None else load_sd_components(args.model).fingerprint()
    concepts, errors = load_concepts(args.dir, fingerprint)
    for c in concepts:
        aliases = f' aliases {c.aliases}' if c.aliases else ''
        print(f'{c.name!r}: "{c.phrase}"{aliases}, {len(c.kv)} K/V modules, base {c.fingerprint}, {c.folder}')
    for folder, message in errors.items():
        print(f'REFUSED {folder}: {message}')
    return 1 if errors else 0


def add_parser(subparsers):
    parser = subparsers.add_parser('concept', help='personal concepts: learn from a few images, list')
    verbs = parser.add_subparsers(dest='concept_verb', required=True, metavar='VERB')
    learn = verbs.add_parser('learn', help='learn a concept (token embedding + cross-attention K/V)')
    learn.add_argument('--images', required=True, help='folder of images of the object')
    learn.add_argument('--name', required=True, help='how queries name it, e.g. "my mug"')
    learn.add_argument('--class-word', required=True, help='its category word, e.g. mug')
    learn.add_argument('--out', required=True, help='concepts directory (the concept gets a folder in it)')
    learn.add_argument('--alias', action='append', default=[], help='another name (repeatable)')
    learn.add_argument('--class-images', default=None,
                       help='folder of other objects of the class (regularisation); default: generated')
    learn.add_argument('--model', default='', help="diffusers folder ('' = embedded SynthWorld model)")
    learn.add_argument('--device', default='cpu')
    learn.add_argument('--dtype', default='float32')
    add_arguments(learn, LearnSettings)
    learn.set_defaults(func=learn_main)
    show = verbs.add_parser('list', help='list the concepts of a directory and why any are refused')
    show.add_argument('--dir', required=True)
    show.add_argument('--model', default=None, help='check the concepts against this model (fingerprint)')
    show.set_defaults(func=list_main)
