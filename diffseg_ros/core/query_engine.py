"""The node's model side: the active queries of a frame, semantic or per instance, with personal concepts.

Query sets of plain text take the semantic path: the configured method, one UNet forward, each query's
mask doubling as its instance. As soon as a phrase names a concept ("my mug"), the whole set takes the
instance path (PersonalSegmenter: foreground of the class word, spectral clustering, Hungarian
assignment; its first forward also serves the plain phrases). Plain queries thus keep their exact
semantics and cost (method, CRF, mask threshold; no self-attention product or clustering), and planners
read the same assignments either way. ROS-free; not thread-safe: one thread (the node's worker) calls it.
"""
from dataclasses import dataclass, field, replace
import os

from .assignments import instance_labels, semantic_instances
from .concepts import ConceptError, ConceptLibrary, normalise_name, safe_folder_name
from .instances import InstanceQuery, PersonalConfig, PersonalSegmenter
from .segmenter import Segmenter


@dataclass
class QueryState:
    queries: list                  # InstanceQuery per kept phrase (concept '' for plain text)
    mode: str = 'semantic'         # 'semantic' | 'instances'
    truncated: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


@dataclass
class FrameResult:
    mode: str
    queries: list                  # QueryResult per active query
    labels: object                 # uint8 [H, W]: k = k-th query, 0 = none
    instances: object              # uint16 [H, W]: instance ids, 0 = none
    timings: dict


@dataclass
class ReloadReport:
    loaded: list                   # Concept
    refused: dict                  # folder -> why
    note: str = ''

    @property
    def ok(self):
        return not self.refused and not self.note

    def summary(self):
        """Return one line: what loaded and what was refused."""
        names = ', '.join(f'{c.name!r} ("{c.phrase}")' for c in self.loaded) or 'none'
        text = f'loaded {len(self.loaded)} concept(s): {names}'
        if self.refused:
            refused = [f'{os.path.basename(folder)}: {why}' for folder, why in self.refused.items()]
            text += f'; refused {len(refused)}: ' + '; '.join(refused)
        return f'{text}; {self.note}' if self.note else text


def instance_config(config, sd):
    """Return the instance path's config: T2M SelfCross (its defaults if another method is set).

    Frames keep their own size between the model's training size (concepts are learned there) and
    image_size: learned K/V do not carry over to resampled frames (SynthMug, 4 mugs, 128-px frames: af_acc
    0.74 at 128 px, 0.48 upscaled to 256; demo scene, 256 x 192 frames: right instance 0/6 at 128, 5/6 at
    256).
    """
    if config.method != 't2m':
        config = replace(config, method='t2m', timestep=-1, cross_layers=(), self_layers=())
    return replace(config, min_image_size=config.min_image_size or sd.native_image_size)


class QueryEngine:
    """Raises ModelLoadError (model) or ValueError (configuration) from the constructor."""

    def __init__(self, config, personal_config=None, concepts_dir=''):
        self.segmenter = Segmenter(config)
        self.library = ConceptLibrary(self.segmenter.sd)
        personal_seg = Segmenter(instance_config(config, self.segmenter.sd), components=self.segmenter.sd)
        self.personal = PersonalSegmenter(personal_seg, self.library, personal_config or PersonalConfig())
        self.concepts_dir = concepts_dir
        self.phrases = []
        self.state = QueryState([])

    @property
    def active(self):
        return bool(self.state.queries)

    def set_config(self, config):
        """Apply runtime threshold changes to both paths."""
        self.segmenter.set_config(config)
        self.personal.seg.config = instance_config(config, self.segmenter.sd)

    # --- concepts -------------------------------------------------------------------------------------------
    def reload(self):
        """(Re)load every concept of concepts_dir, resolve the active phrases again; return a ReloadReport.

        If installing fails as a whole, the previous concepts stay installed.
        """
        if not self.concepts_dir:
            return ReloadReport([], {}, 'no concepts_dir set')
        previous = list(self.library.concepts)
        if not os.path.isdir(self.concepts_dir):
            self.library.install([])
            report = ReloadReport([], {}, f'{self.concepts_dir} does not exist yet (learned concepts go '
                                          'there)')
        else:
            try:
                loaded = self.library.load_dir(self.concepts_dir)
            except Exception:
                self.library.install(previous)
                raise
            report = ReloadReport(loaded, dict(self.library.errors))
        self.segmenter.clear_text_cache()          # tokens may have changed meaning
        self.set_queries(self.phrases)
        return report

    def concepts(self):
        """Describe the installed concepts for the node's state topic."""
        return [{'name': c.name, 'aliases': list(c.aliases), 'class_word': c.class_word, 'token': c.token}
                for c in self.library.concepts]

    def check_new_concept(self, name, aliases=()):
        """Raise ConceptError when a new concept's name or alias is already a name or alias of another one."""
        for text in (name, *aliases):
            other = self.library.find(text)
            if other is not None and safe_folder_name(other.name) != safe_folder_name(name):
                raise ConceptError(f'{text!r} already names the concept {other.name!r}')

    def trainer(self):
        """Return a ConceptTrainer on the base model; build it here, between frames, then train elsewhere."""
        from ..training.custom_diffusion import ConceptTrainer   # training code only when learning
        return ConceptTrainer.from_library(self.library)

    # --- queries and frames ---------------------------------------------------------------------------------
    def set_queries(self, phrases):
        """Make phrases active (names and aliases of concepts resolved); returns the QueryState."""
        self.phrases = list(phrases)
        resolved = [self.personal.resolve(p) for p in phrases]
        if not any(q.concept for q in resolved):
            kept = self.segmenter.set_queries(phrases)
            queries = [InstanceQuery(text, text) for text in kept.queries]
            self.state = QueryState(queries, 'semantic', list(kept.truncated), list(kept.warnings))
            return self.state
        unique, warnings = [], []
        for query in resolved:
            same = [q for q in unique if normalise_name(q.prompt) == normalise_name(query.prompt)]
            if same:
                warnings.append(f'{query.text!r} means the same as {same[0].text!r}; dropped')
            else:
                unique.append(query)
        # The instance path's passes use subsets of these prompts: if all fit in one prompt, each pass does.
        kept = self.personal.seg.set_queries([q.prompt for q in unique])
        queries = [q for q in unique if q.prompt in kept.queries]
        truncated = [q.text for q in unique if q.prompt not in kept.queries]
        self.state = QueryState(queries, 'instances', truncated, warnings + list(kept.warnings))
        return self.state

    def segment(self, rgb):
        """Segment a frame for the active queries; returns a FrameResult."""
        if self.state.mode == 'instances':
            result = self.personal.segment(rgb, self.state.queries)
            labels = instance_labels(result.instances, result.queries)
            return FrameResult('instances', result.queries, labels, result.instances, result.timings)
        result = self.segmenter.segment(rgb)
        instances, queries = semantic_instances(result)
        return FrameResult('semantic', queries, result.labels, instances, result.timings)

    def class_mask(self, rgb, class_word):
        """Return the T2M mask [H, W] of a class word alone in a frame (crops for learning)."""
        return self.personal.seg.segment(rgb, [class_word]).masks[0]
