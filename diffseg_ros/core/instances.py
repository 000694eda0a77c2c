"""Personalized referring segmentation (T2M section 5.3): find *my* mug among the mugs.

1. Foreground: a first query names the class words ("a photo including mug."); T2M SelfCross labels give
   each class word's area.
2. Segments: spectral clustering (Ng-Jordan-Weiss) of the self-attention among the foreground positions of
   the attention grid, the number of clusters chosen by the largest eigengap (bounded), each cluster split
   into its connected pieces so that two look-alike objects apart in the image stay apart.
3. Scores: a second query holds the concept queries in context ("a photo including red <new1> mug,
   <new2> mug."); each query's SelfCross map, read from the tokens that tell its instance apart (the
   phrase without its class word: "red <new1>"), is averaged inside every segment of its class word.
4. Assignment: Hungarian (scipy linear_sum_assignment, maximising the scores) of each class word's queries
   to its segments; the best segment of each query alone is reported too (T2M's bf_acc protocol).
Plain-text queries (no class word) get their T2M mask from the first query, as an instance of their own.
"""
from dataclasses import asdict, dataclass, field
import hashlib
import time

import numpy as np
import torch
from scipy import linalg, ndimage
from sklearn.cluster import KMeans

from .fusion import assign
from .images import check_rgb
from .masks import bbox, iou
from .settings import setting, Settings


@dataclass
class PersonalConfig(Settings):
    max_segments: int = setting(6, 'upper bound of the instances a class word is split into', low=1, high=32)
    min_score: float = setting(0.0, 'a query is assigned no instance when its best joint score is below this',
                               low=0.0, high=1.0)
    affinity_power: int = setting(1, 'cluster the self-attention S or S^2 (T2M propagates with S^2)',
                                  choices=(1, 2), exposed=False)
    kv_mode: str = setting('merged', "concept K/V: 'merged' (one forward for all concepts) or 'separate' "
                                     '(one forward per concept)', choices=('merged', 'separate'),
                           exposed=False)
    fit_prompt: bool = setting(True, 'merged K/V also fit the concept tokens of the exact composed prompt',
                               exposed=False)
    seed: int = setting(0, 'seed of the spectral clustering', exposed=False)


@dataclass
class InstanceQuery:
    """A query as the model reads it; with a class word it is assigned to one segment of that word."""

    text: str                    # as the user wrote it ('my mug')
    prompt: str                  # as the model reads it ('<new1> mug')
    class_word: str = ''         # '' = plain query (its own T2M mask)
    concept: str = ''            # concept name, '' for none


@dataclass
class QueryResult:
    text: str
    prompt: str
    concept: str
    class_word: str
    instance_id: int = 0         # joint (Hungarian) choice; 0 = none
    score: float = 0.0
    alone_instance_id: int = 0   # best segment of this query alone
    alone_score: float = 0.0
    bbox: list = None            # [x, y, w, h] of the instance at input resolution
    pixels: int = 0

    def to_dict(self):
        return asdict(self)


@dataclass
class InstanceResult:
    instances: np.ndarray        # uint16 [H, W]: 0 = none, else an instance id
    queries: list                # QueryResult per query, in the order given
    segments: list               # per instance: dict(instance_id, class_word, pixels, bbox)
    scores: dict                 # class word -> dict(queries, instance_ids, matrix)
    maps: dict = field(default_factory=dict)      # prompt -> SelfCross map on the attention grid
    warnings: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


# --- clustering and assignment (pure functions) ----------------------------------------------------------
def eigengap_count(eigenvalues, max_k):
    """Cluster count = position of the largest gap among the smallest max_k + 1 Laplacian eigenvalues."""
    values = np.sort(np.asarray(eigenvalues, float))[:max_k + 1]
    if len(values) < 2:
        return 1
    return int(np.argmax(np.diff(values))) + 1


def spectral_segments(affinity, max_segments, seed=0):
    """Spectral clustering (Ng-Jordan-Weiss) of a nonnegative affinity [n, n]; returns labels [n] from 0.

    The affinity is symmetrised and its diagonal ignored; the count is chosen by the eigengap of the
    normalised Laplacian, at most max_segments.
    """
    w = np.asarray(affinity, float)
    n = len(w)
    if n < 3 or max_segments < 2:
        return np.zeros(n, int)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    scale = 1 / np.sqrt(np.maximum(w.sum(1), 1e-12))
    normalised = scale[:, None] * w * scale[None, :]
    window = min(2 * max_segments, n - 1)       # look past the bound: more clusters than allowed -> the bound
    values, vectors = linalg.eigh(normalised, subset_by_index=[n - window - 1, n - 1])
    laplacian, vectors = 1 - values[::-1], vectors[:, ::-1]          # ascending Laplacian eigenvalues
    k = min(eigengap_count(laplacian, window), max_segments)
    if k == 1:
        return np.zeros(n, int)
    embedding = vectors[:, :k]
    embedding = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    return KMeans(k, n_init=10, random_state=seed).fit_predict(embedding)


def split_connected(labels):
    """Split each cluster of a label grid (0 = none) into 8-connected pieces, numbered 1.. in scan order."""
    out = np.zeros(labels.shape, np.int32)
    count = 0
    for value in np.unique(labels[labels > 0]):
        pieces, n = ndimage.label(labels == value, structure=np.ones((3, 3)))
        for i in range(1, n + 1):
            count += 1
            out[pieces == i] = count
    return out


def segment_means(maps, grid, ids):
    """Mean of each map [Q, h, w] inside each segment id of a label grid -> [Q, len(ids)]."""
    onehot = (grid[None] == np.asarray(ids)[:, None, None]).astype(np.float64)
    sums = np.einsum('qhw,shw->qs', np.asarray(maps, np.float64), onehot)
    return sums / np.maximum(onehot.sum((1, 2)), 1)


def without_class_word(span, input_ids, class_ids):
    """Drop a phrase's trailing class-word tokens from its span ('red <new1> mug' -> 'red <new1>').

    The class word attends to every object of its kind alike (on a small model to objects of any kind), so
    it only blurs which instance a query means. A span that is just the class word stays as it is.
    """
    n = len(class_ids)
    if n and len(span) > n and [input_ids[p] for p in span[-n:]] == list(class_ids):
        return span[:-n]
    return span


def self_attention_matrix(layers, power=1):
    """Head- and sample-mean self-attention probabilities [HW, HW] of captured layers (same size), ^power."""
    if not layers:
        raise ValueError('no captured self-attention layer at the size of the score grid')
    total = 0
    for layer in layers:
        q, k = layer.q.float(), layer.k.float()
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):          # one head at a time bounds memory at large grids
                total = total + torch.softmax(q[b, h] @ k[b, h].T * layer.scale, dim=-1)
        total = total / (q.shape[0] * q.shape[1])
    matrix = total / len(layers)
    return (matrix @ matrix if power == 2 else matrix).numpy()


# --- metrics (T2M: mIoU, bf_acc, af_acc) ------------------------------------------------------------------
def truth_instance(instances, truth, candidates):
    """Return the candidate instance overlapping the truth mask best (IoU); 0 if none overlaps."""
    best, best_iou = 0, 0.0
    for instance_id in candidates:
        value = iou(instances == instance_id, truth)
        if value > best_iou:
            best, best_iou = instance_id, value
    return best


def score_query(result, query, truth):
    """T2M's per-query numbers: IoU of the assigned instance, and whether the alone / joint choice is right.

    The right instance is the segment of the query's class word overlapping the truth object best.
    """
    candidates = [s['instance_id'] for s in result.segments if s['class_word'] == query.class_word]
    right = truth_instance(result.instances, truth, candidates)
    predicted = result.instances == query.instance_id if query.instance_id else np.zeros_like(truth)
    return dict(iou=iou(predicted, truth), bf=bool(right and query.alone_instance_id == right),
                af=bool(right and query.instance_id == right), reachable=bool(right))


def summarise(rows):
    """mIoU, bf_acc, af_acc over per-query rows (and the share whose right instance was segmented at all)."""
    if not rows:
        return dict(miou=0.0, bf_acc=0.0, af_acc=0.0, reachable=0.0, count=0)
    mean = {key: float(np.mean([r[key] for r in rows])) for key in ('iou', 'bf', 'af', 'reachable')}
    return dict(miou=mean['iou'], bf_acc=mean['bf'], af_acc=mean['af'], reachable=mean['reachable'],
                count=len(rows))


# --- the pipeline ------------------------------------------------------------------------------------------
class PersonalSegmenter:
    """Instances and query assignment on a frame, from a T2M Segmenter and (optionally) a ConceptLibrary.

    It changes the segmenter's active queries, so give it a Segmenter of its own (it may share the loaded
    model: `Segmenter(config, components=other.sd)`).
    """

    def __init__(self, segmenter, library=None, config=None):
        if segmenter.settings.method != 't2m':
            raise ValueError("personal segmentation reads T2M SelfCross maps: needs a 't2m' Segmenter")
        self.seg = segmenter
        self.library = library
        self.config = (config or PersonalConfig()).validate()
        self._text_version = library.text_version if library else 0
        self._first_cache = None

    def resolve(self, query):
        return resolve_query(self.library, query)

    def segment(self, rgb, queries):
        """Segment a frame for queries (str or InstanceQuery); returns an InstanceResult."""
        start = time.perf_counter()
        rgb = check_rgb(rgb)
        self._sync_text_cache()
        queries = [self.resolve(q) for q in queries]
        class_words = unique(q.class_word for q in queries if q.class_word)
        plain = unique(q.prompt for q in queries if not q.class_word)
        first = self._first_pass(rgb, plain + [w for w in class_words if w not in plain])
        timings = dict(first_pass=time.perf_counter() - start)
        warnings = list(first['warnings'])
        instances = np.zeros(rgb.shape[:2], np.uint16)
        grid = np.zeros(first['scores'].shape[1:], np.int32)
        segments, ids_of = [], {}
        for word in class_words:
            ids_of[word] = self._add_segments(first, word, grid, instances, segments, warnings)
        timings['clustering'] = time.perf_counter() - start - timings['first_pass']
        assigned = [q for q in queries if q.class_word]
        maps = self._query_maps(rgb, {q.prompt: q.class_word for q in assigned}, warnings) if assigned else {}
        timings['second_pass'] = time.perf_counter() - start - sum(timings.values())
        results = [QueryResult(q.text, q.prompt, q.concept, q.class_word) for q in queries]
        scores = {}
        for word in class_words:
            scores[word] = self._assign_word(word, ids_of[word], queries, results, maps, grid)
        self._add_plain(first, plain, queries, results, instances, segments)
        describe_segments(instances, results, segments)
        timings['total'] = time.perf_counter() - start
        return InstanceResult(instances, results, segments, scores, maps, warnings, timings)

    # --- passes -------------------------------------------------------------------------------------------
    def _sync_text_cache(self):
        """Prompt embeddings cached by the segmenter are stale once the library changed tokens."""
        version = self.library.text_version if self.library else 0
        if version != self._text_version:
            self.seg.clear_text_cache()
            self._text_version = version
            self._first_cache = None

    def _scores(self, rgb, prompts, fit=False, class_words=None):
        """One UNet forward with these prompts: (kept prompts, frame, T2M scores [K+1, h, w]).

        fit: merged concepts also fit their tokens in this exact composed prompt for the forward.
        class_words: {prompt: class word}; those prompts are read without their class word.
        """
        kept = self.seg.set_queries(prompts)
        if fit and self.library is not None:
            with self.library.fitted([self.seg.prompt.text]):
                frame = self.seg.attend(rgb)
        else:
            frame = self.seg.attend(rgb)
        spans = frame.spans
        if class_words:
            ids = self.seg.prompt.input_ids
            class_ids = {q: self.seg.token_ids(w) for q, w in class_words.items()}
            spans = [without_class_word(span, ids, class_ids[q]) if q in class_ids else span
                     for q, span in zip(kept.queries, spans)]
        return kept, frame, self.seg.scores(frame, spans)

    def _first_pass(self, rgb, prompts):
        """Compute class-word foreground, plain-query masks, self-attention (cached per frame and prompt)."""
        kv_version = self.library.kv_version if self.library else 0
        key = (hashlib.sha1(rgb.tobytes()).hexdigest(), rgb.shape, tuple(prompts), kv_version)
        if self._first_cache and self._first_cache['key'] == key:
            return self._first_cache
        kept, frame, scores = self._scores(rgb, prompts)
        size = tuple(scores.shape[1:])
        captured = frame.capture.self_qk
        layers = [captured[n] for n in self.seg.settings.self_layers if captured[n].size == size]
        labels_full = self.seg.to_image(scores, frame).argmax(0).numpy()
        self._first_cache = dict(key=key, frame=frame, scores=scores.numpy(), labels_full=labels_full,
                                 channel={q: i + 1 for i, q in enumerate(kept.queries)},
                                 attention=self_attention_matrix(layers, self.config.affinity_power),
                                 valid=self.seg.cells_inside(frame, size), warnings=kept.warnings)
        return self._first_cache

    def _query_maps(self, rgb, class_words, warnings):
        """Compute each assignment query's SelfCross map [h, w] in one forward (or one per concept).

        class_words: {prompt: class word} of the assignment queries, in order.
        """
        kept, _, scores = self._scores(rgb, list(class_words), self.config.fit_prompt, class_words)
        warnings += kept.warnings
        maps = {q: scores[i + 1].numpy() for i, q in enumerate(kept.queries)}
        if self.config.kv_mode == 'separate' and self.library and len(self.library.concepts) > 1:
            maps.update(self._separate_maps(rgb, kept.queries, class_words))
        return maps

    def _separate_maps(self, rgb, prompts, class_words):
        """Each concept query's map from a forward with only that concept's K/V (all tokens installed)."""
        library, concepts, maps = self.library, list(self.library.concepts), {}
        try:
            for concept in concepts:
                mine = [i for i, p in enumerate(prompts) if concept.token in p.split()]
                if not mine:
                    continue
                library.install(concepts, kv_concepts=[concept])
                _, _, scores = self._scores(rgb, prompts, class_words=class_words)
                maps.update({prompts[i]: scores[i + 1].numpy() for i in mine})
        finally:
            library.install(concepts)
        return maps

    # --- segments and assignment --------------------------------------------------------------------------
    def _add_segments(self, first, word, grid, instances, segments, warnings):
        """Cluster a class word's foreground into segments; paint them into grid and instances; their ids."""
        channel = first['channel'].get(word)
        if channel is None:
            warnings.append(f'class word {word!r} was dropped from the prompt (token limit)')
            return []
        foreground = (first['scores'].argmax(0) == channel) & first['valid']
        positions = np.flatnonzero(foreground)
        if len(positions) == 0:
            return []
        attention = first['attention'][np.ix_(positions, positions)]
        local = np.zeros(grid.shape, np.int32)
        local.flat[positions] = spectral_segments(attention, self.config.max_segments, self.config.seed) + 1
        pieces = split_connected(local)
        first_id = len(segments) + 1
        ids = list(range(first_id, first_id + pieces.max()))
        grid[pieces > 0] = pieces[pieces > 0] + first_id - 1
        onehot = torch.from_numpy((grid[None] == np.asarray(ids)[:, None, None]).astype(np.float32))
        upsampled = self.seg.to_image(onehot, first['frame']).numpy()
        free = (first['labels_full'] == channel) & (upsampled.max(0) > 0.1) & (instances == 0)
        instances[free] = np.asarray(ids, np.uint16)[upsampled.argmax(0)[free]]
        for instance_id in ids:
            segments.append(dict(instance_id=instance_id, class_word=word))
        return ids

    def _assign_word(self, word, ids, queries, results, maps, grid):
        """Hungarian assignment of the word's queries to its segments; fills their results."""
        rows = [i for i, q in enumerate(queries) if q.class_word == word and q.prompt in maps]
        matrix = segment_means(np.stack([maps[queries[i].prompt] for i in rows]), grid, ids) \
            if rows and ids else np.zeros((len(rows), len(ids)))
        alone, joint = assign(matrix, self.config.min_score)
        for r, i in enumerate(rows):
            if alone[r] >= 0:
                result, best = results[i], alone[r]
                result.alone_instance_id, result.alone_score = ids[best], float(matrix[r, best])
            if joint[r] >= 0:
                results[i].instance_id, results[i].score = ids[joint[r]], float(matrix[r, joint[r]])
        return dict(queries=[queries[i].prompt for i in rows], instance_ids=ids, matrix=matrix.tolist())

    def _add_plain(self, first, plain, queries, results, instances, segments):
        """Make each plain query's T2M mask an instance of its own (claiming pixels no segment holds)."""
        for prompt in plain:
            channel = first['channel'].get(prompt)
            mask = first['labels_full'] == channel if channel else np.zeros(instances.shape, bool)
            for r in add_plain_instance(mask, prompt, queries, results, instances, segments):
                r.score = r.alone_score = float(first['scores'][channel][_grid_mask(mask, first)].mean())
                r.bbox, r.pixels = bbox(mask), int(mask.sum())


def _grid_mask(mask, first):
    """Return a full-resolution mask's footprint on the attention grid (nearest cell), never empty."""
    h, w = first['scores'].shape[1:]
    rows = (np.arange(h) + 0.5) * mask.shape[0] / h
    cols = (np.arange(w) + 0.5) * mask.shape[1] / w
    small = mask[rows.astype(int)[:, None], cols.astype(int)[None, :]]
    return small if small.any() else np.ones_like(small)


def describe_segments(instances, results, segments):
    """Pixels and bbox of every segment and of every query's assigned instance, from the instance image."""
    for segment in segments:
        mask = instances == segment['instance_id']
        segment['pixels'], segment['bbox'] = int(mask.sum()), bbox(mask)
    for result in results:
        if result.instance_id:
            mask = instances == result.instance_id
            result.pixels, result.bbox = int(mask.sum()), bbox(mask)


def resolve_query(library, query):
    """Turn a str (or InstanceQuery) into an InstanceQuery; concept names resolve through the library."""
    if isinstance(query, InstanceQuery):
        return query
    text = ' '.join(str(query).split())
    if library is not None:
        prompt, concept = library.resolve(text)
        if concept is not None:
            return InstanceQuery(text, prompt, concept.class_word, concept.name)
    return InstanceQuery(text, text)


def unique(items):
    """Return the items in their order, each once."""
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def add_plain_instance(mask, prompt, queries, results, instances, segments):
    """Make a plain (concept-free) query's mask an instance of its own, claiming pixels no segment holds.

    Returns the results of the queries with that prompt (assigned the new instance); none for an empty mask.
    """
    if not mask.any():
        return []
    instance_id = len(segments) + 1
    instances[mask & (instances == 0)] = instance_id
    segments.append(dict(instance_id=instance_id, class_word=''))
    hits = [r for q, r in zip(queries, results) if not q.class_word and q.prompt == prompt]
    for r in hits:
        r.instance_id = r.alone_instance_id = instance_id
    return hits
