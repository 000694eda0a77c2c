"""Personal concepts (Custom Diffusion): concept folders, safe loading, installation into a loaded model.

A concept folder (named from the concept's sanitised name inside a concepts directory) holds:
  <new1>.safetensors                             {"<new1>": token embedding [D]}       (diffusers format)
  pytorch_custom_diffusion_weights.safetensors   {"<attn>.processor.to_k_custom_diffusion.weight": W_k,
                                                  "<attn>.processor.to_v_custom_diffusion.weight": W_v, ...}
  concept.json                                   name, aliases, class word, token, base-model fingerprint,
                                                 training settings
Only safetensors and JSON are ever read: pickles can execute code.

Installing puts the learned K/V into the attention modules' own `to_k` / `to_v` weights (same shapes, no
bias), so every processor -- stock or capture -- uses them. diffusers' `load_attn_procs` silently installs
nothing (diffusers issue 9320), and a capture processor replacing a Custom Diffusion processor would drop
its K/V. Several concepts are merged in closed form as in the Custom Diffusion paper (section 3.2): keep
W c ~ W0 c for regularisation caption features c, and map every concept's token features (in its training
templates and in composed segmentation prompts) exactly to its own learned outputs. Uninstalling restores
the base weights, tokenizer and embedding exactly.
"""
from dataclasses import dataclass, field
import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
import time

import jsonschema
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .appearance import save_prototypes
from .prompts import DEFAULT_BACKGROUND_WORDS

KV_FILE = 'pytorch_custom_diffusion_weights.safetensors'
META_FILE = 'concept.json'
K_SUFFIX = '.processor.to_k_custom_diffusion.weight'
V_SUFFIX = '.processor.to_v_custom_diffusion.weight'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
PICKLE_MAGIC = (b'PK\x03\x04', b'\x80')          # torch zip archive, pickle protocol >= 2
# Captions a concept is learned with (Custom Diffusion), and those whose concept-token features the merge
# maps exactly: the training captions and the composed prompts of personal segmentation (other concepts
# and attribute words before the token).
TRAINING_TEMPLATES = ('photo of a {}', 'a photo of a {}', 'a photo including {}.',
                      'a photo of the {} on a table.')
MERGE_TEMPLATES = TRAINING_TEMPLATES + ('a photo including red {}.', 'a photo including mug, bottle, {}.')
REGULARISATION_CAPTIONS = 96
MERGE_RIDGE = 1e-3          # x mean eigenvalue of C_reg^T C_reg: keeps W near W0 where captions say nothing
CONSTRAINT_RIDGE = 1e-4     # x mean eigenvalue of A: near-duplicate constraint rows are fitted, not exploded
TOKEN_PATTERN = r'^<[a-z0-9_-]{1,32}>$'
META_SCHEMA = {
    'type': 'object',
    'required': ['name', 'class_word', 'token', 'fingerprint'],
    'properties': {
        'name': {'type': 'string', 'minLength': 1, 'maxLength': 100},
        'aliases': {'type': 'array', 'items': {'type': 'string', 'minLength': 1, 'maxLength': 100}},
        'class_word': {'type': 'string', 'minLength': 1, 'maxLength': 50},
        'token': {'type': 'string', 'pattern': TOKEN_PATTERN},
        'fingerprint': {'type': 'string', 'minLength': 1},
        'training': {'type': 'object'},
    },
}


class ConceptError(ValueError):
    """A concept cannot be saved, loaded or installed; the message says which file and why."""


@dataclass
class Concept:
    name: str
    class_word: str
    token: str                     # '<new1>'; made unique among the concepts loaded together
    embedding: torch.Tensor = field(repr=False)    # [D] float32
    kv: dict = field(repr=False)                   # attention module name -> (W_k, W_v), float32
    fingerprint: str               # SDComponents.fingerprint() of the base model it was trained on
    aliases: list = field(default_factory=list)
    training: dict = field(default_factory=dict, repr=False)
    folder: str = ''
    appearance: object = field(default=None, repr=False)   # appearance.Prototypes saved with it (or None)

    @property
    def phrase(self):
        """How a query names the concept: '<new1> mug'."""
        return f'{self.token} {self.class_word}'

    @property
    def names(self):
        """Normalised name and aliases a query may use."""
        return [normalise_name(n) for n in [self.name, *self.aliases]]


# --- names and folders ------------------------------------------------------------------------------------
def normalise_name(name):
    """Lower case, single spaces, printable characters only."""
    text = ''.join(ch if ch.isprintable() else ' ' for ch in str(name))
    return ' '.join(text.lower().split())


def safe_folder_name(name):
    """Map a concept name to a folder name ('My Mug!' -> 'my-mug'); refuse names leaving the folder."""
    raw = str(name)
    if any(sep in raw for sep in ('/', '\\', '\x00')) or '..' in raw:
        raise ConceptError(f'concept name {raw!r} contains a path separator or ".."; refused')
    folder = re.sub(r'[^a-z0-9._-]+', '-', normalise_name(raw)).strip('.-_')[:64]
    if not folder:
        raise ConceptError(f'concept name {raw!r} has no usable characters')
    return folder


def next_free_token(concepts_dir, name=None):
    """'<newN>' not used by another concept of the directory (a concept being replaced keeps its token)."""
    tokens = {}
    if concepts_dir and os.path.isdir(concepts_dir):
        tokens = {entry: _read_token(os.path.join(concepts_dir, entry))
                  for entry in os.listdir(concepts_dir) if not entry.startswith('.')}
    own = tokens.get(safe_folder_name(name)) if name is not None else None
    if own:
        return own
    n = 1
    while f'<new{n}>' in tokens.values():
        n += 1
    return f'<new{n}>'


def _read_token(folder):
    try:
        with open(os.path.join(folder, META_FILE), encoding='utf-8') as f:
            return json.load(f).get('token')
    except (OSError, ValueError):
        return None


def concept_folder(concepts_dir, name):
    """Path of a concept's folder inside concepts_dir, guaranteed to stay inside it."""
    root = os.path.realpath(concepts_dir)
    path = os.path.realpath(os.path.join(root, safe_folder_name(name)))
    if os.path.dirname(path) != root:
        raise ConceptError(f'concept folder {path} would leave {root}; refused')
    return path


# --- saving (atomic) --------------------------------------------------------------------------------------
def save_concept(concept, concepts_dir):
    """Write a concept folder atomically; returns its path.

    Files go to a temporary folder first; then the previous folder is moved aside, the new one renamed into
    place and the old one deleted. A save killed at any point leaves either the previous concept or the new
    one complete (a moved-aside previous folder is put back by `recover_interrupted_saves`).
    """
    os.makedirs(concepts_dir, exist_ok=True)
    target = concept_folder(concepts_dir, concept.name)
    root, folder = os.path.split(target)
    recover_interrupted_saves(root)
    tmp = tempfile.mkdtemp(prefix=f'.tmp-{folder}-', dir=root)
    try:
        write_concept_files(concept, tmp)
        backup = os.path.join(root, f'.old-{folder}')
        if os.path.isdir(target):
            os.rename(target, backup)
        os.rename(tmp, target)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    concept.folder = target
    return target


def write_concept_files(concept, folder):
    """Write the files of a concept folder (each flushed to disk); the prototypes too when it has them."""
    embedding = {concept.token: concept.embedding.detach().float().cpu().contiguous()}
    _save_tensors(embedding, os.path.join(folder, f'{concept.token}.safetensors'))
    _save_tensors(kv_state_dict(concept.kv), os.path.join(folder, KV_FILE))
    meta = dict(format=1, name=concept.name, aliases=list(concept.aliases), class_word=concept.class_word,
                token=concept.token, fingerprint=concept.fingerprint, training=concept.training)
    with open(os.path.join(folder, META_FILE), 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if concept.appearance is not None:     # the visual memory goes into the same atomic save
        save_prototypes(concept.appearance, folder)


def recover_interrupted_saves(concepts_dir, stale_seconds=3600):
    """Put back a previous concept moved aside by a killed save; drop old temporary folders."""
    if not os.path.isdir(concepts_dir):
        return
    for entry in os.listdir(concepts_dir):
        path = os.path.join(concepts_dir, entry)
        if entry.startswith('.old-'):
            original = os.path.join(concepts_dir, entry[len('.old-'):])
            if os.path.isdir(original):          # the new folder was committed: the old one is garbage
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, original)
        elif entry.startswith('.tmp-') and time.time() - os.path.getmtime(path) > stale_seconds:
            shutil.rmtree(path, ignore_errors=True)


def kv_state_dict(kv):
    """Convert {module: (W_k, W_v)} to diffusers' Custom Diffusion keys."""
    out = {}
    for name, (k, v) in kv.items():
        out[name + K_SUFFIX] = k.detach().float().cpu().contiguous()
        out[name + V_SUFFIX] = v.detach().float().cpu().contiguous()
    return out


def _save_tensors(tensors, path):
    save_file(tensors, path)
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- loading (safetensors and JSON only) ------------------------------------------------------------------
def load_concept(folder, fingerprint=None):
    """Read one concept folder; refuse pickles, corrupt files and (when given) another base model."""
    meta = _read_meta(folder)
    name = meta['name']
    if fingerprint is not None and meta['fingerprint'] != fingerprint:
        raise ConceptError(f'concept {name!r} ({folder}) was trained on base model {meta["fingerprint"]}, '
                           f'but the loaded model is {fingerprint}; learn it again on this model')
    token = meta['token']
    tensors = read_safetensors(os.path.join(folder, f'{token}.safetensors'))
    if set(tensors) != {token}:
        raise ConceptError(f'{folder}/{token}.safetensors must hold exactly the key {token!r}, '
                           f'found {sorted(tensors)}')
    embedding = tensors[token].float().reshape(-1)
    kv = parse_kv(read_safetensors(os.path.join(folder, KV_FILE)), os.path.join(folder, KV_FILE))
    for tensor in [embedding, *[w for pair in kv.values() for w in pair]]:
        if not torch.isfinite(tensor).all():
            raise ConceptError(f'concept {name!r} ({folder}) holds non-finite weights')
    return Concept(name, meta['class_word'], token, embedding, kv, meta['fingerprint'],
                   list(meta.get('aliases', [])), dict(meta.get('training', {})), folder)


def read_safetensors(path):
    """Load a safetensors file to CPU; pickles (whatever their name) and corrupt files raise ConceptError."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        pickles = [f for f in sorted(os.listdir(folder)) if f.endswith(PICKLE_SUFFIXES)]
        hint = f'; found only pickle files {pickles}, which are never loaded (convert them to safetensors)' \
            if pickles else ''
        raise ConceptError(f'missing {path}{hint}')
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(PICKLE_MAGIC):
        raise ConceptError(f'{path} is a pickle / torch archive, not safetensors; pickles are never loaded '
                           '(they can run code)')
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ConceptError(f'{path} is not a valid safetensors file ({err})') from err


def parse_kv(tensors, path=''):
    """Convert diffusers' Custom Diffusion keys to {module: (W_k, W_v)}; refuse other keys (q/out weights)."""
    kv = {}
    for key, value in tensors.items():
        for suffix, slot in ((K_SUFFIX, 0), (V_SUFFIX, 1)):
            if key.endswith(suffix):
                kv.setdefault(key[:-len(suffix)], [None, None])[slot] = value.float()
                break
        else:
            raise ConceptError(f'{path}: unexpected key {key!r} (only to_k / to_v Custom Diffusion weights)')
    incomplete = [name for name, pair in kv.items() if None in pair]
    if incomplete:
        raise ConceptError(f'{path}: modules without both K and V weights: {incomplete[:3]}')
    return {name: tuple(pair) for name, pair in kv.items()}


def _read_meta(folder):
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        raise ConceptError(f'missing {path}')
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
        jsonschema.validate(meta, META_SCHEMA)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConceptError(f'{path} is not valid JSON ({err})') from err
    except jsonschema.ValidationError as err:
        raise ConceptError(f'{path}: {err.message}') from err
    return meta


def load_concepts(concepts_dir, fingerprint=None):
    """Load every concept folder of a directory; returns (concepts, {folder: error message}).

    Tokens are made unique among the loaded concepts (independently learned concepts may all be '<new1>';
    the token is only a handle to the embedding). Duplicate names or aliases are refused.
    """
    concepts, errors = [], {}
    if not os.path.isdir(concepts_dir):
        return concepts, {concepts_dir: 'not a directory'}
    recover_interrupted_saves(concepts_dir)
    taken_names = set()
    for entry in sorted(os.listdir(concepts_dir)):
        folder = os.path.join(concepts_dir, entry)
        if entry.startswith('.') or not os.path.isdir(folder):
            continue
        try:
            concept = load_concept(folder, fingerprint)
        except ConceptError as err:
            errors[folder] = str(err)
            continue
        clash = taken_names.intersection(concept.names)
        if clash:
            errors[folder] = f'name or alias {sorted(clash)} already used by another concept'
            continue
        taken_names.update(concept.names)
        concepts.append(concept)
    unique_tokens(concepts)
    return concepts, errors


def unique_tokens(concepts):
    """Rename repeated tokens to the next free '<newN>' (in memory; files keep theirs)."""
    used = set()
    for concept in concepts:
        if concept.token in used:
            n = 1
            while f'<new{n}>' in used or any(c.token == f'<new{n}>' for c in concepts):
                n += 1
            concept.token = f'<new{n}>'
        used.add(concept.token)
    return concepts


# --- installation into a loaded model ---------------------------------------------------------------------
def text_attention_modules(unet):
    """[(name, Attention)] of every attention module fed by the text (cross-attention K/V)."""
    return [(name, module) for name, module in unet.named_modules()
            if hasattr(module, 'to_k') and getattr(module, 'is_cross_attention', False)]


class ExtendedEmbedding(torch.nn.Module):
    """Token embedding table plus extra rows for new tokens (ids >= the base vocabulary size).

    The base table is shared, never copied or changed, so removing this module restores the model exactly.
    """

    def __init__(self, base, extra):
        super().__init__()
        self.base = base
        self.extra = extra if isinstance(extra, torch.nn.Parameter) else torch.nn.Parameter(extra, False)

    @property
    def weight(self):
        """Return the base table (what the model's fingerprint and get_input_embeddings() users expect)."""
        return self.base.weight

    def forward(self, ids):
        size = self.base.num_embeddings
        out = self.base(ids.clamp(max=size - 1))
        new = ids >= size
        if not new.any():
            return out
        rows = self.extra[(ids - size).clamp(0, len(self.extra) - 1)].to(out.dtype)
        return torch.where(new[..., None], rows, out)


def _embeddings(text_encoder):
    """Return the embeddings module of CLIP (transformers 5 dropped the `text_model` level)."""
    return getattr(text_encoder, 'text_model', text_encoder).embeddings


def token_embedding_module(text_encoder):
    return _embeddings(text_encoder).token_embedding


def set_token_embedding_module(text_encoder, module):
    _embeddings(text_encoder).token_embedding = module


def base_token_embedding(text_encoder):
    """Return the base nn.Embedding, whether or not concepts are installed."""
    module = token_embedding_module(text_encoder)
    return module.base if isinstance(module, ExtendedEmbedding) else module


class ConceptLibrary:
    """The concepts installed into one loaded model (SDComponents); restores the base model exactly.

    Create it on a model without concepts. `install` / `uninstall` / `load_dir` change the shared model in
    place, so the caller must not run a forward pass at the same time (the node: between frames, under its
    lock). `text_version` changes whenever prompt embeddings must be recomputed.
    """

    def __init__(self, components, regularisation_captions=REGULARISATION_CAPTIONS, merge_ridge=MERGE_RIDGE):
        if isinstance(token_embedding_module(components.text_encoder), ExtendedEmbedding):
            raise ConceptError('this model already has concepts installed by another ConceptLibrary')
        self.sd = components
        self.fingerprint = components.fingerprint()
        self.base_tokenizer = components.tokenizer
        self.base_embedding = token_embedding_module(components.text_encoder)
        self.base_kv = {name: (m.to_k.weight.detach().clone(), m.to_v.weight.detach().clone())
                        for name, m in text_attention_modules(components.unet)}
        self.concepts = []           # installed concepts
        self.errors = {}             # folder -> why it was refused, from the last load_dir
        self.text_version = 0        # changes when prompt embeddings must be recomputed
        self.kv_version = 0          # changes whenever the installed K/V change
        self.regularisation_captions = regularisation_captions
        self.merge_ridge = merge_ridge
        self.constraint_ridge = CONSTRAINT_RIDGE
        self._kv_concepts = []       # concepts whose K/V are in the model
        self._merges = {}            # prompts -> merged K/V of the installed concepts
        self._gram = None
        self._text_signature = ()

    # --- loading ------------------------------------------------------------------------------------------
    def load_dir(self, concepts_dir):
        """Load every concept of a directory that fits this model and install them all; returns them.

        Refused folders (wrong base model, corrupt, pickled, incompatible shapes) are listed in `errors`.
        """
        concepts, errors = load_concepts(concepts_dir, self.fingerprint)
        usable = []
        for concept in concepts:
            try:
                self.check_compatible(concept)
                usable.append(concept)
            except ConceptError as err:
                errors[concept.folder] = str(err)
        self.errors = errors
        self.install(usable)
        return usable

    def check_compatible(self, concept):
        """Shapes and module names of a concept must fit this model."""
        hidden = self.base_embedding.weight.shape[1]
        if concept.embedding.numel() != hidden:
            raise ConceptError(f'concept {concept.name!r}: embedding size {concept.embedding.numel()} != '
                               f'text encoder width {hidden}')
        for name, (k, v) in concept.kv.items():
            if name not in self.base_kv:
                raise ConceptError(f'concept {concept.name!r}: the UNet has no cross-attention module {name}')
            base_k, base_v = self.base_kv[name]
            if k.shape != base_k.shape or v.shape != base_v.shape:
                raise ConceptError(f'concept {concept.name!r}: K/V shapes of {name} {tuple(k.shape)} do not '
                                   f'match the model {tuple(base_k.shape)}')

    # --- install / uninstall --------------------------------------------------------------------------------
    def install(self, concepts, kv_concepts=None):
        """Make exactly `concepts` active: tokens, embeddings and K/V (those of `kv_concepts`, default all).

        One concept's K/V are written as learned; several are merged in closed form (`merge_kv`).
        kv_concepts=[] installs the tokens only (base K/V).
        """
        self.uninstall(bump=False)
        concepts = unique_tokens(list(concepts))
        for concept in concepts:
            self.check_compatible(concept)
        if concepts:
            self._install_tokens(concepts)
        kv_concepts = concepts if kv_concepts is None else list(kv_concepts)
        kv_concepts = [c for c in kv_concepts if c.kv]
        if len(kv_concepts) == 1:
            self._write_kv(kv_concepts[0].kv)
        elif kv_concepts:
            self._kv_concepts = kv_concepts
            self._write_kv(self._merged(()))
        self.concepts = concepts
        self.kv_version += 1
        self._bump_text_version()
        return concepts

    @contextlib.contextmanager
    def fitted(self, prompts):
        """Within the block, the merge also fits the concept tokens of these exact prompts.

        The merge captions only approximate a token's context in a composed prompt ('a photo including
        red <new1> mug, <new2> mug, ...'); fitting the prompt itself removes most of that error. Merges
        are cached per prompt set (no UNet forward); the prompt-independent merge is back afterwards.
        """
        prompts = tuple(prompts)
        tokens = {c.token for c in self._kv_concepts}
        if len(self._kv_concepts) < 2 or not any(tokens.intersection(p.split()) for p in prompts):
            yield
            return
        self._write_kv(self._merged(prompts))
        try:
            yield
        finally:
            self._write_kv(self._merged(()))

    def _merged(self, prompts):
        if prompts not in self._merges:
            if len(self._merges) > 16:
                self._merges.pop(next(iter(self._merges)))
            self._merges[prompts] = self.merge_kv(self._kv_concepts, prompts)
        return self._merges[prompts]

    def uninstall(self, bump=True):
        """Restore the base K/V, token embedding and tokenizer exactly."""
        self._write_kv({})
        self._kv_concepts, self._merges = [], {}
        set_token_embedding_module(self.sd.text_encoder, self.base_embedding)
        self.sd.tokenizer = self.base_tokenizer
        self.concepts = []
        if bump:
            self.kv_version += 1
            self._bump_text_version()

    def _install_tokens(self, concepts):
        tokenizer = copy.deepcopy(self.base_tokenizer)
        tokens = [c.token for c in concepts]
        if any(t in self.base_tokenizer.get_vocab() for t in tokens):
            raise ConceptError(f'token among {tokens} is already a word of the base vocabulary')
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        first = self.base_embedding.num_embeddings
        if ids != list(range(first, first + len(tokens))):
            raise ConceptError(f'unexpected ids {ids} for new tokens (base vocabulary {first})')
        weight = self.base_embedding.weight
        extra = torch.stack([c.embedding for c in concepts]).to(weight.device, weight.dtype)
        set_token_embedding_module(self.sd.text_encoder, ExtendedEmbedding(self.base_embedding, extra))
        self.sd.tokenizer = tokenizer

    def _write_kv(self, kv):
        """Write K/V into the modules (base weights where kv has no entry)."""
        modules = dict(text_attention_modules(self.sd.unet))
        with torch.no_grad():
            for name, (base_k, base_v) in self.base_kv.items():
                k, v = kv.get(name, (base_k, base_v))
                modules[name].to_k.weight.copy_(k)
                modules[name].to_v.weight.copy_(v)

    def _bump_text_version(self):
        signature = tuple((c.token, _digest(c.embedding)) for c in self.concepts)
        if signature != self._text_signature:
            self._text_signature = signature
            self.text_version += 1

    # --- closed-form merge ----------------------------------------------------------------------------------
    def merge_kv(self, concepts, prompts=()):
        """Closed-form K/V merge of several concepts (Custom Diffusion, section 3.2).

        For each module: minimise ||C_reg (W - W0)^T||^2 + lambda ||W - W0||^2 over W subject to
        C_i W^T = C_i W_i^T for every concept i, where C_reg are text features of regularisation captions
        and C_i the features of concept i's token in its merge captions. Solution: W = W0 + R A^-1 C M^-1
        with M = C_reg^T C_reg + lambda I, A = C M^-1 C^T, R = V^T - W0 C^T. The small ridge lambda
        (merge_ridge x mean eigenvalue of C_reg^T C_reg) matters: CLIP's final LayerNorm leaves C_reg nearly
        singular, and without it W is free to blow up along unpenalised directions. Needs the concepts'
        tokens installed (their features).
        """
        gram = self.regularisation_gram()
        targets = [self.target_features(c, concepts, prompts) for c in concepts]
        stacked = torch.cat(targets)                                          # [s, D]
        dim = gram.shape[0]
        m = gram + self.merge_ridge * gram.trace() / dim * torch.eye(dim, dtype=gram.dtype)
        m_inv_ct = torch.linalg.solve(m, stacked.T)                           # [D, s]
        a = stacked @ m_inv_ct
        a = a + self.constraint_ridge * a.trace() / len(a) * torch.eye(len(a), dtype=a.dtype)
        projector = torch.linalg.solve(a, m_inv_ct.T)                         # A^-1 C M^-1  [s, D]
        merged = {}
        for name, (base_k, base_v) in self.base_kv.items():
            pair = []
            for slot, base in ((0, base_k), (1, base_v)):
                w0 = base.double().cpu()
                learned = [c.kv[name][slot].double() if name in c.kv else w0 for c in concepts]
                wanted = torch.cat([f @ w.T for f, w in zip(targets, learned)])      # [s, out]
                residual = wanted.T - w0 @ stacked.T                                  # [out, s]
                pair.append((w0 + residual @ projector).to(base.dtype))
            merged[name] = tuple(pair)
        return merged

    def target_features(self, concept, concepts=(), prompts=()):
        """Features [s, D] (float64) of the concept's token in its merge captions.

        Only the token's own position is constrained: later positions ('mug', end token) look alike for all
        concepts of a class word, and mapping near-equal features to different outputs would blow up W.
        """
        others = [c.phrase for c in concepts if c is not concept]
        captions = [t.format(concept.phrase) for t in MERGE_TEMPLATES]
        if others:
            captions += [f"a photo including {', '.join(order)}, {concept.phrase}."
                         for order in (others, others[::-1])]
        captions += [p for p in prompts if concept.token in p.split()]
        token_id = self.sd.tokenizer.convert_tokens_to_ids(concept.token)
        rows = []
        for caption in captions:
            ids = self.sd.tokenizer(caption).input_ids
            rows.append(self._encode([ids])[0][ids.index(token_id)])
        return torch.stack(rows)

    def regularisation_gram(self):
        """C_reg^T C_reg [D, D] (float64) of features of everyday captions, every position (cached).

        The captions hold no concept token, so installed concepts do not change their features.
        """
        if self._gram is None:
            tokenizer = self.sd.tokenizer
            ids = tokenizer(regularisation_captions(self.regularisation_captions), padding='max_length',
                            max_length=tokenizer.model_max_length, truncation=True).input_ids
            gram = 0
            for i in range(0, len(ids), 32):
                features = self._encode(ids[i:i + 32]).reshape(-1, self.base_embedding.weight.shape[1])
                gram = gram + features.T @ features
            self._gram = gram
        return self._gram

    def _encode(self, ids):
        with torch.inference_mode():
            tensor = torch.tensor(ids, device=self.sd.device)
            return self.sd.text_encoder(tensor)[0].double().cpu()

    # --- queries ------------------------------------------------------------------------------------------
    def find(self, text):
        """Return the installed concept named or aliased by exactly this text (or its token), else None."""
        key = normalise_name(text)
        for concept in self.concepts:
            if key in concept.names or key == concept.token:
                return concept
        return None

    def resolve(self, text):
        """Rewrite a query naming a concept into model text; returns (prompt, concept or None).

        'my mug' -> '<new1> mug'; 'my mug with dots' -> '<new1> mug with dots'; a query already holding
        a concept token is kept. The longest matching name or alias wins; other queries are unchanged.
        """
        normal = normalise_name(text)
        for concept in self.concepts:
            if concept.token in normal.split():
                return normal, concept
        best = None
        for concept in self.concepts:
            for name in concept.names:
                match = re.search(rf'(?<![\w<]){re.escape(name)}(?![\w>])', normal)
                if match and (best is None or len(name) > len(best[1])):
                    best = (concept, name, match)
        if best is None:
            return str(text), None
        concept, _, match = best
        rest = normal[match.end():].split()
        phrase = concept.token if rest[:1] == [concept.class_word] else concept.phrase
        return ' '.join([normal[:match.start()].strip(), phrase, ' '.join(rest)]).strip(), concept

    def word_embedding(self, word):
        """Return the mean base input embedding [D] of a word's tokens (the Arithmetic baseline)."""
        ids = self.base_tokenizer(word, add_special_tokens=False).input_ids
        return self.base_embedding.weight[ids].detach().float().mean(0).cpu()


def _digest(tensor):
    return hashlib.sha1(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()


def regularisation_captions(count, seed=0):
    """Everyday household captions and composed segmentation prompts for the merge's regularisation term."""
    colours = ('red', 'green', 'blue', 'yellow', 'orange', 'purple', 'white', 'black', 'pink', 'brown')
    things = ('mug', 'bottle', 'bowl', 'box', 'ball', 'can', 'book', 'plant pot', 'cup', 'vase', 'chair',
              'table', 'lamp', 'plate', 'phone', 'keyboard', 'bag', 'shoe', 'towel', 'glass')
    places = ('on a wooden table', 'on the floor', 'in a kitchen', 'on a shelf', 'next to a window', '')
    background = ', '.join(DEFAULT_BACKGROUND_WORDS[:-1]) + f', and {DEFAULT_BACKGROUND_WORDS[-1]}.'
    templates = ('a photo of a {c} {t} {p}', 'a photo including {c} {t}, {c2} {t2}, and {t3}.',
                 '{c} {t} and {c2} {t2} {p}', 'a picture of the {t} {p}', 'photo of a {t}',
                 'a photo including {t}, ' + background, 'a photo including {c} {t}, {t2}, ' + background)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        choices = dict(c=colours, c2=colours, t=things, t2=things, t3=things, p=places)
        pick = {k: str(rng.choice(v)) for k, v in choices.items()}
        out.append(' '.join(templates[i % len(templates)].format(**pick).split()))
    return out
