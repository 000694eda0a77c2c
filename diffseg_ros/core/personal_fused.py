"""The fused instance path (issue 18): proposals, three evidences and Hungarian from ONE UNet forward.

Per frame:
1. One composed prompt holds the class words, the concept queries (merged concept K/V, fitted to this
   exact prompt), plain queries and the stuff words: "a photo including mug, red <new1> mug, <new2> mug,
   table, and floor." One VAE encode + one UNet forward captures the cross-attention of the evidence layers,
   the self-attention of one layer and the decoder features (forward hooks).
2. Class-agnostic proposals (core/proposals.py) from the objectness of that forward (phrases vs stuff
   words), GrabCut at the model's input size (all per-pixel work is; only the final instance image is
   resized to the frame) and self-attention merging of edge-following superpixels.
3. Per concept query and proposal: subject (concept token), context (the query's other words), class (the
   class word) -- mean cross-attention inside the proposal -- and appearance (prototype similarity of the
   proposal's pooled decoder features); standardised over the frame's proposals and added with weights
   chosen on validation draws (core/fusion.py).
4. Hungarian per class word (bf: each query alone). Plain queries keep T2M's SelfCross mask from the same
   forward as an instance of their own.
ROS-free; not thread-safe. Give it a Segmenter of its own resolved for the instance path
(`Segmenter(config, components=other.sd, instances=True)`: T2M's layers and noise, the instance timestep,
stuff words as phrases).
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
import time

import numpy as np
import torch

from .appearance import (FEATURE_LAYERS, PROTOTYPE_SCALES, AppearanceError, Prototypes, feature_map,
                         grid_weights, load_prototypes, pool, rescale_view)
from .fusion import EVIDENCES, Calibration, assign, fuse, standardise_all
from .images import check_rgb, resize_labels
from .instances import (add_plain_instance, describe_segments, InstanceQuery, InstanceResult, QueryResult,
                        resolve_query, unique)
from .methods.common import query_cross_maps
from .proposals import ProposalConfig, bilinear_cells, objectness, propose, region_means

# Chosen on SynthMug validation draws (seeds 1 and 2), see docs/RESEARCH_18.md.
DEFAULT_WEIGHTS = {'subject': 0.10, 'context': 0.81, 'appearance': 1.15, 'class': -0.16, 'subject~': 0.52,
                   'context~': 0.89, 'appearance~': 0.40}       # docs/eval_personal_calibration.json, 'ours'
DENSE_ROWS_LIMIT = 8_000_000    # pixels x attention keys up to which per-pixel rows are formed densely


@dataclass
class FusedConfig:
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    calibration: Calibration = field(default_factory=lambda: Calibration(dict(DEFAULT_WEIGHTS)))
    feature_layers: tuple = FEATURE_LAYERS
    object_words: str = 'class'          # objectness from: 'class' words or 'all' phrases (minus stuff)
    top_k: int = 3                       # appearance: mean of the best top_k prototype similarities
    min_score: float = -np.inf           # a joint assignment scoring below this is dropped
    fit_prompt: bool = True              # merged concepts also fit the tokens of the exact composed prompt


@dataclass
class FusedQueryResult(QueryResult):
    evidence: dict = field(default_factory=dict)      # per evidence: raw score and z of the chosen proposal


class FusedPersonalSegmenter:
    """Instances and assignment of (concept) queries on a frame from one UNet forward."""

    def __init__(self, segmenter, library=None, config=None, prototypes=None):
        settings = segmenter.settings
        if settings.method != 't2m' or settings.background_words:
            raise ValueError('the fused instance path needs a Segmenter resolved for it (instances=True)')
        self.seg = segmenter
        self.library = library
        self.config = config or FusedConfig()
        self.stuff_words = settings.stuff_words       # phrases of their own: their attention is read
        self.evidence_layers = list(settings.cross_layers)
        self.self_layer = settings.self_layers[0]
        self.prototypes = dict(prototypes or {})  # concept name -> Prototypes
        self.errors = {}
        self._text_version = library.text_version if library else 0

    # --- concepts' visual memory --------------------------------------------------------------------------
    def load_prototypes(self):
        """(Re)load the prototypes of the library's concepts from their folders; returns {name: bool}.

        A concept without a prototype file (learned before prototypes existed) is scored by attention only;
        a file of another model or feature set is refused (listed in `errors`), the concept still loads.
        """
        self.prototypes, self.errors = {}, {}
        fingerprint = self.library.fingerprint if self.library else None
        for concept in (self.library.concepts if self.library else []):
            if not concept.folder:
                continue
            try:
                found = load_prototypes(concept.folder, fingerprint, self.config.feature_layers)
            except AppearanceError as err:
                self.errors[concept.name] = str(err)
                continue
            if found is not None:
                self.prototypes[concept.name] = found
        return {c.name: c.name in self.prototypes for c in (self.library.concepts if self.library else [])}

    def resolve(self, query):
        return resolve_query(self.library, query)

    # --- the forward --------------------------------------------------------------------------------
    def _sync_text_cache(self):
        version = self.library.text_version if self.library else 0
        if version != self._text_version:
            self.seg.clear_text_cache()
            self._text_version = version

    def forward(self, rgb, prompts):
        """One VAE encode + UNet forward with these phrases (+ stuff words); returns what it read."""
        self._sync_text_cache()
        kept = self.seg.set_queries(list(prompts) + [w for w in self.stuff_words if w not in prompts])
        fit = self.config.fit_prompt and self.library is not None
        with (self.library.fitted([self.seg.prompt.text]) if fit else nullcontext()):
            frame = self.seg.attend(rgb, feature_layers=self.config.feature_layers)
        return dict(kept=kept, frame=frame, features=frame.features, prompt=self.seg.prompt)

    def token_maps(self, read, groups):
        """Mean cross-attention of token groups (lists of prompt positions) at input size [G, h, w]."""
        frame = read['frame']
        sizes = [frame.capture.layer_size(frame.capture.cross[n].shape[1]) for n in self.evidence_layers]
        finest = max(sizes, key=lambda s: s[0] * s[1])
        groups = [g if len(g) else [0] for g in groups]
        maps = query_cross_maps(frame.capture, self.evidence_layers, groups, finest).mean(0)     # [G, h, w]
        return self.seg.to_input(maps, frame).numpy()

    def attention(self, read):
        """Return the proposal layer's self-attention and each input pixel's place on its grid.

        Head- and noise-mean attention [HW, HW] (rows = queries), summed head by head so that at most two
        such matrices exist (what the attention budget counts); bilinear neighbours (index, weight
        [h, w, 4]) of the pixels of the frame at input size.
        """
        frame = read['frame']
        layer = frame.capture.self_qk[self.self_layer]
        q, k = layer.q.float(), layer.k.float()
        total = 0
        for b in range(q.shape[0]):
            for head in range(q.shape[1]):
                total = total + torch.softmax(q[b, head] @ k[b, head].T * layer.scale, -1)
        cells = bilinear_cells(frame.where.valid, frame.where.valid, frame.where.padded, layer.size)
        return total / (q.shape[0] * q.shape[1]), cells

    def attention_maps(self, read):
        """Return the same attention as per-pixel rows [K, h, w] at input size (bilinear in the query)."""
        attention, _ = self.attention(read)
        layer = read['frame'].capture.self_qk[self.self_layer]
        return self.seg.to_input(attention.T.reshape(-1, *layer.size), read['frame'])

    # --- a frame --------------------------------------------------------------------------------
    def segment(self, rgb, queries, weights=None, evidences=EVIDENCES):
        """Segment a frame for queries (str or InstanceQuery); returns an InstanceResult.

        weights: override the calibrated weights (e.g. one evidence only); evidences: which to compute.
        """
        start = time.perf_counter()
        rgb = check_rgb(rgb)
        queries = [self.resolve(q) for q in queries]
        class_words = unique(q.class_word for q in queries if q.class_word)
        assigned = [q for q in queries if q.class_word]
        plain = unique(q.prompt for q in queries if not q.class_word)
        phrases = unique(class_words + [q.prompt for q in assigned] + plain)
        read = self.forward(rgb, phrases)
        image = read['frame'].image            # per-pixel work: the frame, at most at the model's input size
        t_forward = time.perf_counter()
        kept, prompt = read['kept'], read['prompt']
        warnings = list(kept.warnings)
        span_of = dict(zip(kept.queries, prompt.spans))
        ids = prompt.input_ids

        # token groups: class words, stuff words, per query subject / context
        groups, index = [], {}

        def group(key, positions):
            index[key] = len(groups)
            groups.append(list(positions))

        for word in class_words:
            group(('class', word), span_of.get(word, []))
        for word in self.stuff_words:
            group(('stuff', word), span_of.get(word, []))
        for q in assigned:
            span = span_of.get(q.prompt)
            if span is None:
                warnings.append(f'{q.text!r} was dropped from the prompt (token limit)')
                continue
            class_ids = self.seg.token_ids(q.class_word)
            token = next((c.token for c in (self.library.concepts if self.library else [])
                          if c.name == q.concept), None)
            token_ids = self.seg.token_ids(token) if token else []
            subject = [p for p in span if ids[p] in token_ids]
            body = span[:-len(class_ids)] if len(span) > len(class_ids) and \
                [ids[p] for p in span[-len(class_ids):]] == class_ids else span
            context = [p for p in body if p not in subject]
            group(('subject', q.prompt), subject)
            group(('context', q.prompt), context)
            group(('phrase', q.prompt), span)
        for p in plain:
            if p in span_of:
                group(('phrase', p), span_of[p])
        maps = self.token_maps(read, groups)
        t_maps = time.perf_counter()

        # proposals
        things = [maps[index[('class', w)]] for w in class_words if ('class', w) in index and span_of.get(w)]
        if self.config.object_words == 'all' or not things:
            things += [maps[i] for (kind, _), i in index.items() if kind == 'phrase']
        stuff = [maps[index[('stuff', w)]] for w in self.stuff_words if span_of.get(w)]
        objectness_map = objectness(np.stack(things) if things else np.zeros((1, *image.shape[:2])),
                                    np.stack(stuff) if stuff else None)
        attention, cells = self.attention(read)
        if image.shape[0] * image.shape[1] * len(attention) <= DENSE_ROWS_LIMIT:   # validated form (SynthMug)
            proposals = propose(image, objectness_map, self.attention_maps(read), self.config.proposals)
        else:                                                # large inputs: bilinear weights, sparse
            proposals = propose(image, objectness_map, attention, self.config.proposals, cells)
        count = proposals.count
        t_props = time.perf_counter()
        means = region_means(maps, proposals.labels, count) if count else np.zeros((len(maps), 0))

        # appearance of every proposal
        pooled, sizes = None, None
        need_appearance = 'appearance' in evidences and any(q.concept in self.prototypes for q in assigned)
        if need_appearance and count:
            masks = proposals.masks()
            where = read['frame'].where
            feature = feature_map(read['features'], self.config.feature_layers)
            weights_grid = grid_weights(masks, tuple(feature.shape[-2:]), where.padded, where.valid)
            pooled = pool(feature, weights_grid)
            sizes = [_long_side(m) for m in masks]
        t_app = time.perf_counter()

        # evidence, fusion, assignment
        results = [FusedQueryResult(q.text, q.prompt, q.concept, q.class_word) for q in queries]
        calibrated = dict(self.config.calibration.weights if weights is None else weights)
        instances = proposals.labels.astype(np.uint16)
        segments = [dict(instance_id=i, class_word='') for i in range(1, count + 1)]
        scores = {}
        for word in class_words:
            rows = [i for i, q in enumerate(queries)
                    if q.class_word == word and ('subject', q.prompt) in index]
            raw = {name: np.full((len(rows), count), np.nan) for name in EVIDENCES}
            for r, i in enumerate(rows):
                q = queries[i]
                if 'subject' in evidences and groups[index[('subject', q.prompt)]]:
                    raw['subject'][r] = means[index[('subject', q.prompt)]]
                if 'context' in evidences and groups[index[('context', q.prompt)]]:
                    raw['context'][r] = means[index[('context', q.prompt)]]
                if 'class' in evidences and ('class', word) in index and groups[index[('class', word)]]:
                    raw['class'][r] = means[index[('class', word)]]
                if pooled is not None and q.concept in self.prototypes:
                    raw['appearance'][r] = self.prototypes[q.concept].similarity(
                        pooled, sizes, self.config.top_k).numpy()
            z = standardise_all(raw)
            fused = fuse(z, calibrated) if z and count else np.zeros((len(rows), count))
            if fused is None:
                fused = np.zeros((len(rows), count))
            alone, joint = assign(fused, self.config.min_score)
            for r, i in enumerate(rows):
                result = results[i]
                if alone[r] >= 0:
                    result.alone_instance_id = int(alone[r] + 1)
                    result.alone_score = float(fused[r, alone[r]])
                if joint[r] >= 0:
                    c = joint[r]
                    result.instance_id, result.score = int(c + 1), float(fused[r, c])
                    result.evidence = {name: dict(raw=_finite(raw[name][r, c]),
                                                  z=_finite(z[name][r, c]) if name in z else None,
                                                  z_across=_finite(z[f'{name}~'][r, c])
                                                  if f'{name}~' in z else None,
                                                  weight=float(calibrated.get(name, 0.0)),
                                                  weight_across=float(calibrated.get(f'{name}~', 0.0)))
                                       for name in EVIDENCES}
            for segment in segments:
                segment['class_word'] = word
            scores[word] = dict(queries=[queries[i].prompt for i in rows],
                                instance_ids=list(range(1, count + 1)), matrix=fused.tolist(),
                                raw={k: v.tolist() for k, v in raw.items()})
        t_assign = time.perf_counter()

        # plain queries: T2M SelfCross masks from the same forward, on pixels no proposal holds
        if plain:
            self._add_plain(read, plain, queries, results, instances, segments)
        instances = self.seg.to_frame(instances, read['frame'])
        describe_segments(instances, results, segments)
        timings = dict(forward=t_forward - start, maps=t_maps - t_forward, proposals=t_props - t_maps,
                       appearance=t_app - t_props, assignment=t_assign - t_app)
        timings.update({f'proposals_{k}': v for k, v in proposals.timings.items()})
        timings['total'] = time.perf_counter() - start
        out = InstanceResult(instances, results, segments, scores, {}, warnings, timings)
        out.proposals = proposals
        return out

    def _add_plain(self, read, plain, queries, results, instances, segments):
        frame = read['frame']
        kept = [p for p in plain if p in read['kept'].queries]
        spans = [read['prompt'].spans[read['kept'].queries.index(p)] for p in kept]
        if not kept:
            return
        labels = self.seg.to_input(self.seg.scores(frame, spans), frame).argmax(0).numpy()
        for k, prompt in enumerate(kept):
            add_plain_instance(labels == k + 1, prompt, queries, results, instances, segments)


# --- prototypes while learning ----------------------------------------------------------------------
def object_mask(fused, rgb, class_word):
    """Return the class word's best proposal in a view of one object (prototypes without a given mask)."""
    result = fused.segment(rgb, [InstanceQuery(class_word, class_word)], evidences=())
    proposals = result.proposals                # at the model's input size
    if proposals.count == 0:
        return resize_labels(proposals.foreground, rgb.shape[:2]) if proposals.foreground.any() else None
    read_maps = proposals.objectness
    means = region_means(read_maps[None], proposals.labels, proposals.count)[0]
    sizes = np.bincount(proposals.labels.ravel(), minlength=proposals.count + 1)[1:]
    best = int(np.argmax(means * (sizes >= fused.config.proposals.min_pixels)))
    return resize_labels(proposals.labels == best + 1, rgb.shape[:2])


def extract_prototypes(fused, views, class_word, masks=None, scales=PROTOTYPE_SCALES, canvas=None):
    """Prototypes of an object from its views (RGB uint8) and optional masks (None: the model's own mask).

    Each view is rescaled so the object's long side is each of `scales` px on a canvas of the model's
    training size, run once through the fused path's forward (class word and stuff words, no concept),
    and its decoder features are pooled inside the object. Returns Prototypes (None if no view had a mask).
    """
    canvas = canvas or fused.seg.sd.native_image_size
    vectors, kept_scales, used = [], [], 0
    for i, view in enumerate(views):
        view = check_rgb(view)
        mask = masks[i] if masks is not None else object_mask(fused, view, class_word)
        if mask is None or not np.asarray(mask).any():
            continue
        used += 1
        for target in scales:
            scaled = rescale_view(view, np.asarray(mask, bool), target, canvas)
            if scaled is None:
                continue
            rgb, small_mask = scaled
            read = fused.forward(rgb, [class_word])
            where = read['frame'].where
            feature = feature_map(read['features'], fused.config.feature_layers)
            weights = grid_weights(small_mask[None], tuple(feature.shape[-2:]), where.padded, where.valid)
            vectors.append(pool(feature, weights)[0])
            kept_scales.append(float(target) * where.valid[0] / where.frame[0])
    if not vectors:
        return None
    fingerprint = fused.library.fingerprint if fused.library else fused.seg.sd.fingerprint()
    return Prototypes(torch.stack(vectors), torch.tensor(kept_scales), fingerprint,
                      tuple(fused.config.feature_layers), int(fused.seg.settings.timestep),
                      dict(views=len(views), views_used=used, scales=list(scales),
                           masks='given' if masks is not None else 'model'))


def _long_side(mask):
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return 1.0
    return float(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))


def _finite(value):
    value = float(value)
    return value if np.isfinite(value) else None
