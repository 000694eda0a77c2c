"""The segmentation node's model side: queries, semantic or instance path, concepts, learning from the camera.

Query sets of plain text take the semantic path: the configured method, one UNet forward, each query's
mask doubling as its instance. As soon as a phrase names a concept ("my mug"), the whole set takes the
instance path (FusedPersonalSegmenter, also one forward: class-agnostic proposals, each scored by the
concept's token, its context words and its stored appearance, calibrated sums, Hungarian assignment; plain
phrases get T2M masks from the same forward). Plain queries thus keep their exact semantics and cost
(method, CRF, mask threshold), and planners read the same assignments either way. ROS-free; one thread
(the node's worker) calls it, except `learn`, which any thread may call.
"""
from dataclasses import dataclass, field
import os

import numpy as np

from .assignments import instance_labels, semantic_instances
from .concepts import ConceptError, ConceptLibrary, normalise_name, safe_folder_name
from .instances import InstanceQuery
from .learn_job import LearnConfig, LearnFlow
from .personal_fused import extract_prototypes, FusedPersonalSegmenter, object_mask
from .segmenter import Segmenter, SegmenterConfig
from .settings import section, setting, Settings


PERSONAL_WORDS = ('my ', 'our ')   # a phrase starting so asks for a personal concept


@dataclass
class EngineConfig(Settings):
    segmenter: SegmenterConfig = section(SegmenterConfig, '')
    concepts_dir: str = setting('', "folder of personal concepts (one subfolder each, `diffseg concept learn "
                                    "--out`); '' = none")
    learn: LearnConfig = section(LearnConfig, 'learn')


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


class QueryEngine:
    """Raises ModelLoadError (model) or ValueError (configuration) from the constructor.

    on_learn(job) is called whenever a learn job changes (from the calling thread); wake() when the
    engine's thread should call `poll` soon (a learned concept waits to be installed).
    """

    def __init__(self, config, on_learn=None, wake=None):
        self.config = config.validate()
        self.segmenter = Segmenter(config.segmenter)
        self.library = ConceptLibrary(self.segmenter.sd)
        personal_seg = Segmenter(config.segmenter, components=self.segmenter.sd, instances=True)
        self.personal = FusedPersonalSegmenter(personal_seg, self.library)
        self.learning = LearnFlow(config.learn, config.concepts_dir, on_learn, wake)
        self.phrases = []
        self.state = QueryState([])
        self.reload_report = ReloadReport([], {}, 'no concepts_dir set')

    @property
    def active(self):
        return bool(self.state.queries)

    @property
    def wants_frames(self):
        """Frames are worth handing over: queries are set or a learn job is collecting."""
        return self.active or self.learning.collecting

    def update(self, config):
        """Apply changed settings (the runtime ones: thresholds) from the next frame on."""
        self.config = config.validate()
        self.segmenter.set_config(config.segmenter)
        self.personal.seg.set_config(config.segmenter)

    def describe(self):
        """Return static facts for diagnostics and the query state: model, device, method, CRF, ..."""
        return self.segmenter.describe()

    # --- concepts -------------------------------------------------------------------------------------------
    def reload(self):
        """(Re)load every concept of concepts_dir, resolve the active phrases again; return a ReloadReport.

        If installing fails as a whole, the previous concepts stay installed.
        """
        folder = self.config.concepts_dir
        if not folder:
            return self.reload_report
        previous = list(self.library.concepts)
        if not os.path.isdir(folder):
            self.library.install([])
            report = ReloadReport([], {}, f'{folder} does not exist yet (learned concepts go there)')
        else:
            try:
                loaded = self.library.load_dir(folder)
            except Exception:
                self.library.install(previous)
                raise
            report = ReloadReport(loaded, dict(self.library.errors))
        self.personal.load_prototypes()            # the concepts' visual memory (None for older folders)
        self.segmenter.clear_text_cache()          # tokens may have changed meaning
        self.set_queries(self.phrases)
        self.reload_report = report
        return report

    def concepts(self):
        """Describe the installed concepts for the node's state topic."""
        errors = self.personal.errors
        return [{'name': c.name, 'aliases': list(c.aliases), 'class_word': c.class_word, 'token': c.token,
                 'appearance': c.name in self.personal.prototypes,
                 **({'appearance_error': errors[c.name]} if c.name in errors else {})}
                for c in self.library.concepts]

    def check_new_concept(self, name, aliases=()):
        """Raise ConceptError when a new concept's name or alias is already a name or alias of another one."""
        for text in (name, *aliases):
            other = self.library.find(text)
            if other is not None and safe_folder_name(other.name) != safe_folder_name(name):
                raise ConceptError(f'{text!r} already names the concept {other.name!r}')

    def prototypes(self, views, class_word):
        """Appearance prototypes of an object from (frame, mask) views, at the scales the node sees it."""
        if not views:
            return None
        frames, masks = zip(*views)
        return extract_prototypes(self.personal, list(frames), class_word, list(masks))

    def trainer(self):
        """Return a ConceptTrainer on the base model; build it here, between frames, then train elsewhere."""
        from .concept_learning import ConceptTrainer   # its imports cost time only when a concept is learned
        return ConceptTrainer.from_library(self.library)

    # --- learning from the camera ---------------------------------------------------------------------------
    def learn(self, text):
        """Queue a learn request ('my mug = mug') or 'cancel'; returns its LearnJob (any thread)."""
        return self.learning.request(text)

    def poll(self):
        """Advance learning between frames: start a queued job, time out, install a trained concept.

        Returns the ReloadReport when concepts were (re)loaded, else None.
        """
        self.learning.step(self)
        job = self.learning.take_trained()
        if job is None:
            return None
        try:
            report = self.reload()
        except Exception as err:
            job.fail(f'saved {job.concept.folder} but loading failed: {type(err).__name__}: {err}')
            report = None
        else:
            concept = self.library.find(job.request.name)
            if concept is None:
                job.fail(f'saved {job.concept.folder} but it was not loaded: {report.summary()}')
            else:
                job.finish(f'learned {concept.name!r} as "{concept.phrase}" from {len(job.crops)} crops; '
                           f'{report.summary()}')
        self.learning.on_status(job)
        return report

    def close(self):
        self.learning.close()

    # --- queries and frames ---------------------------------------------------------------------------------
    def set_queries(self, phrases):
        """Make phrases active (names and aliases of concepts resolved); returns the QueryState."""
        self.phrases = list(phrases)
        resolved = [self.personal.resolve(p) for p in phrases]
        unknown = self.unknown_concepts(resolved)
        if not any(q.concept for q in resolved):
            kept = self.segmenter.set_queries(phrases)
            queries = [InstanceQuery(text, text) for text in kept.queries]
            self.state = QueryState(queries, 'semantic', list(kept.truncated), unknown + list(kept.warnings))
            return self.state
        unique, warnings = [], unknown
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

    def unknown_concepts(self, resolved):
        """Warn about phrases that look like a personal concept ("my mug") but name none that is loaded."""
        loaded = ', '.join(repr(c.name) for c in self.library.concepts) or 'none'
        return [f'{q.text!r} names no loaded concept (loaded: {loaded}); read as plain text'
                for q in resolved if not q.concept and q.text.casefold().startswith(PERSONAL_WORDS)]

    def process(self, rgb):
        """Serve one frame: its FrameResult for the active queries (None without any), and learning."""
        return self.process_batch([rgb])[0]

    def process_batch(self, rgbs, learn_from=0):
        """Serve several frames (one per camera): a FrameResult (or None) each, and learning.

        Semantic query sets run the frames batched (one forward per input shape); the instance path runs
        them one by one. Learning collects from frame `learn_from` only (None: none of them).
        """
        results = self.segment_batch(rgbs) if self.active else [None] * len(rgbs)
        self.learning.step(self, None if learn_from is None else rgbs[learn_from])
        return results

    def segment(self, rgb):
        """Segment a frame for the active queries; returns a FrameResult."""
        return self.segment_batch([rgb])[0]

    def segment_batch(self, rgbs):
        """Segment frames for the active queries; returns a FrameResult each."""
        if self.state.mode == 'instances':   # its passes and clustering are per frame: looped
            return [self._instances(rgb) for rgb in rgbs]
        results = []
        for result in self.segmenter.segment_batch(rgbs):
            instances, queries = semantic_instances(result)
            results.append(FrameResult('semantic', queries, result.labels, instances, result.timings))
        return results

    def _instances(self, rgb):
        result = self.personal.segment(rgb, self.state.queries)
        labels = instance_labels(result.instances, result.queries)
        return FrameResult('instances', result.queries, labels, result.instances, result.timings)

    def class_mask(self, rgb, class_word):
        """Return the class word's best object proposal [H, W] in a frame (what a learned concept sees)."""
        mask = object_mask(self.personal, rgb, class_word)
        return np.zeros(rgb.shape[:2], bool) if mask is None else mask
