"""LDMSeg end to end: image -> instance ids (`sample`), and sparse labels + image -> dense ids (`complete`).

A model folder holds config.json (LDMSegConfig), mask_autoencoder.safetensors, and diffusers folders
unet/, vae/ (the image VAE the denoiser was trained with, copied so the folder is self-contained) and
scheduler/. Weights are stored in fp16 and computed in the dtype asked for at load time.

Label spaces: the model works with ids 1..127 (0 = void). `complete` remaps the caller's labels into 1..127
(core.geometry.remap_labels) and maps the result back, so known segments keep their ids; segments the model
adds get fresh ids above the largest input label.
"""
from dataclasses import asdict, dataclass, field, replace
import copy
import json
import os

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from scipy import ndimage
from safetensors.torch import load_file, save_file

from ..core.geometry import remap_labels, restore_labels
from ..core.images import to_pixels
from ..core.model_folder import ModelLoadError, needs, require_complete, resolve_model_path, torch_dtype
from .autoencoder import MaskAutoencoder, MaskAutoencoderConfig
from .bits import NUM_IDS
from .inpaint import DEFAULT_MIN_FRACTION, encode_known, known_cells
from .model import ddim_sample, make_scheduler

EMBEDDED_NAME = 'ldmseg-synthworld'
EMBEDDED_LDMSEG = resolve_model_path('', EMBEDDED_NAME)
AE_FILE = 'mask_autoencoder.safetensors'
REQUIREMENTS = [needs(name) for name in ('config.json', AE_FILE, 'unet/config.json', 'vae/config.json',
                                         'scheduler/scheduler_config.json')]


def paper_min_area(width, height):
    """Scale the paper's minimum segment area (512 px at 512 x 512) to another image size."""
    return max(1, int(round(512 * width * height / 512 ** 2)))


@dataclass
class LDMSegConfig:
    size: tuple = (128, 128)           # (width, height) the model works at; other inputs are resized
    image_scaling: float = 1.0         # image latent = VAE posterior mean x this
    mask_scaling: float = 1.0          # mask latent = mask encoder mean x this
    steps: int = 50
    resample: int = 1                  # inpainting: passes per step (RePaint's resampling; 1 = the paper's)
    samples: int = 1                   # inpainting: samples merged by per-pixel vote (1 = the paper's)
    mask_threshold: float = 0.5        # pixels whose top softmax probability is lower become void
    min_area: int = 32                 # segments smaller than this (pixels at `size`) become void
    fill_void: bool = True             # dense output: drop pieces < min_area, void takes the nearest id
    known_min_fraction: float = DEFAULT_MIN_FRACTION  # share of known pixels that makes a latent cell known
    autoencoder: dict = field(default_factory=lambda: MaskAutoencoderConfig().to_dict())
    training: dict = field(default_factory=dict)       # provenance written by the trainer

    @classmethod
    def from_dict(cls, data):
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data['size'] = tuple(data.get('size', (128, 128)))
        return cls(**data)


def postprocess(logits, threshold, min_area, fill_void=False):
    """Turn logits into argmax ids (B, H, W) int64 with the paper's clean-up (0.5 and 512 px at 512 x 512).

    Pixels whose top softmax probability is under `threshold`, and ids covering fewer than `min_area` pixels,
    become void (0). With `fill_void` (our addition, not the paper's), connected pieces under `min_area`
    become void too, and every void pixel then takes the id of the nearest kept pixel: bit-coded ids leave
    thin strips of stray ids along boundaries and splinters on textured objects, and a completed label image
    should have no holes.
    """
    confidence, ids = logits.float().softmax(dim=1).max(dim=1)
    ids[confidence < threshold] = 0
    for image in ids:
        areas = torch.bincount(image.view(-1), minlength=logits.shape[1])
        image[areas[image] < min_area] = 0
    if fill_void:
        ids = torch.from_numpy(np.stack([make_dense(i, min_area) for i in ids.cpu().numpy()]))
    return ids


def make_dense(ids, min_area):
    """Drop pieces under `min_area` and give every void pixel the nearest id (`fill_void`)."""
    return fill_from_nearest(drop_small_pieces(ids, min_area))


def drop_small_pieces(ids, min_area):
    """Set the 4-connected pieces of each id that cover fewer than `min_area` pixels to void (0)."""
    out = ids.copy()
    for segment in np.unique(ids[ids > 0]):
        _, pieces, stats, _ = cv2.connectedComponentsWithStats((ids == segment).astype(np.uint8),
                                                               connectivity=4)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < min_area)
        out[np.isin(pieces, small[small > 0])] = 0
    return out


def fill_from_nearest(ids):
    """Give every void pixel the id of the nearest non-void pixel (all void stays void)."""
    void = ids == 0
    if void.all() or not void.any():
        return ids
    _, (rows, cols) = ndimage.distance_transform_edt(void, return_indices=True)
    return ids[rows, cols]


def _as_batch(array, ndim):
    array = np.asarray(array)
    return (array[None], True) if array.ndim == ndim else (array, False)


def _resize(array, size, nearest):
    if array.shape[1::-1] == tuple(size):
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(array, tuple(size), interpolation=interpolation)


class LDMSeg:
    """Image VAE + mask autoencoder + denoising UNet + DDIM scheduler, with the paper's post-processing."""

    def __init__(self, vae, mask_autoencoder, unet, config=None, scheduler=None):
        self.vae, self.mask_autoencoder, self.unet = vae, mask_autoencoder, unet
        self.config = config or LDMSegConfig()
        self.scheduler = scheduler or make_scheduler()
        for module in (vae, mask_autoencoder, unet):
            module.eval().requires_grad_(False)

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def factor(self):
        return self.mask_autoencoder.config.factor

    # --- storage --------------------------------------------------------------------------------------------
    def save(self, path, half=True):
        """Write the model folder (fp16 weights when `half`)."""
        os.makedirs(path, exist_ok=True)
        for name in ('unet', 'vae'):
            module = copy.deepcopy(getattr(self, name))
            module = module.half() if half else module
            module.save_pretrained(os.path.join(path, name), safe_serialization=True)
        state = self.mask_autoencoder.state_dict()
        state = {k: (v.half() if half else v).contiguous() for k, v in state.items()}
        save_file(state, os.path.join(path, AE_FILE))
        self.scheduler.save_pretrained(os.path.join(path, 'scheduler'))
        with open(os.path.join(path, 'config.json'), 'w') as f:
            json.dump(asdict(self.config), f, indent=1)
        return path

    @classmethod
    def load(cls, path='', device='cpu', dtype='float32', **settings):
        """Load a model folder ('' = the embedded SynthWorld model) for inference.

        settings: LDMSegConfig fields to use instead of the folder's (e.g. fill_void=False, samples=1).
        """
        path = resolve_model_path(path, EMBEDDED_NAME)
        require_complete(path, REQUIREMENTS, 'LDMSeg')
        dtype = torch_dtype(dtype)
        with open(os.path.join(path, 'config.json')) as f:
            config = replace(LDMSegConfig.from_dict(json.load(f)), **settings)
        kwargs = dict(local_files_only=True, torch_dtype=dtype)
        try:
            unet = UNet2DModel.from_pretrained(os.path.join(path, 'unet'), **kwargs)
            vae = AutoencoderKL.from_pretrained(os.path.join(path, 'vae'), **kwargs)
            scheduler = DDIMScheduler.from_pretrained(os.path.join(path, 'scheduler'), local_files_only=True)
            ae = MaskAutoencoder(MaskAutoencoderConfig.from_dict(config.autoencoder))
            ae.load_state_dict(load_file(os.path.join(path, AE_FILE)))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f'could not load LDMSeg from {path}: {err}') from err
        model = cls(vae.to(device), ae.to(device, dtype), unet.to(device), config, scheduler)
        model.path = path
        return model

    # --- latents --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images):
        """uint8 (B, H, W, 3) -> scaled image latents (B, 4, H/f, W/f)."""
        latents = self.vae.encode(to_pixels(images).to(self.device, self.dtype)).latent_dist.mean
        return latents * self.config.image_scaling

    @torch.no_grad()
    def decode_latents(self, latents):
        """Scaled mask latents -> post-processed ids (B, H, W) int64 at the working size (0 = void)."""
        logits = self.mask_autoencoder.decode(latents / self.config.mask_scaling)
        config = self.config
        return postprocess(logits, config.mask_threshold, config.min_area, config.fill_void).cpu()

    def _generator(self, seed):
        return torch.Generator().manual_seed(int(seed))

    # --- public API -----------------------------------------------------------------------------------------
    def sample(self, image, steps=None, seed=0):
        """Instance ids (H, W) int32 of an RGB uint8 image (or (B, H, W) of a batch); 0 = void."""
        images, single = _as_batch(image, 3)
        height, width = images.shape[1:3]
        work = np.stack([_resize(im, self.config.size, nearest=False) for im in images])
        latents = ddim_sample(self.unet, self.scheduler, self.encode_images(work), steps or self.config.steps,
                              self._generator(seed))
        ids = self.decode_latents(latents).numpy().astype(np.int32)
        ids = np.stack([_resize(i, (width, height), nearest=True) for i in ids])
        return ids[0] if single else ids

    def complete(self, image, sparse_labels, known_mask=None, steps=None, seed=0, keep_known=True,
                 resample=None, samples=None):
        """Dense instance ids from an image and sparse labels (paper algorithm 3), in the labels' id space.

        sparse_labels: (H, W) integer labels, 0 = unknown (any ids; up to 127 distinct are used);
        known_mask: optional bool (H, W) restricting which labelled pixels count as known;
        keep_known: completed segments take the known labels inside them (`assign_known_ids`) and every
        known pixel keeps its given label; resample: passes per denoising step (None = config.resample);
        samples: samples drawn (one batch) and merged by `vote_samples` (None = config.samples).
        Batches: leading B on all arrays.
        Returns int64 ids; 0 = void; segments not in the input get ids above the largest input label.
        Inputs of another size are resized to the working size (nearest for labels, so single scattered
        labelled pixels can be lost when downscaling: project sparse clouds at the working size).
        """
        images, single = _as_batch(image, 3)
        labels, _ = _as_batch(sparse_labels, 2)
        known = labels != 0
        if known_mask is not None:
            known &= _as_batch(known_mask, 2)[0].astype(bool)
        height, width = images.shape[1:3]
        samples = samples or self.config.samples
        if samples < 1:
            raise ValueError(f'samples must be >= 1, got {samples}')
        remapped = [remap_labels(np.where(k, lab, 0)) for k, lab in zip(known, labels)]
        # every sample codes the known labels with its own random ids: the samples then differ more
        rng = np.random.default_rng(seed)
        code_tables = [random_codes(len(table) - 1, rng) for _, table in remapped for _ in range(samples)]
        compact = [c for c, _ in remapped for _ in range(samples)]
        coded = np.stack([codes[c] for c, codes in zip(compact, code_tables)])
        ids = self.decode_latents(self._inpaint(images, coded, steps, seed, resample)).numpy()
        ids = np.stack([_resize(i.astype(np.int32), (width, height), nearest=True) for i in ids])
        if keep_known:
            ids = np.stack([assign_known_ids(i, c) for i, c in zip(ids, coded)])
        ids = np.stack([codes_to_compact(i, codes) for i, codes in zip(ids, code_tables)])
        out = []
        for drawn, (known_compact, table) in zip(ids.reshape(len(images), samples, height, width), remapped):
            merged = vote_samples(drawn, np.arange(1, len(table)), self.config) if samples > 1 else drawn[0]
            if keep_known:
                merged = np.where(known_compact > 0, known_compact, merged)
            out.append(restore_labels(merged, table))
        out = np.stack(out)
        return out[0] if single else out

    def _inpaint(self, images, coded, steps, seed, resample):
        """Mask latents completing coded known ids (one row each); images repeat to match their rows."""
        work_images = np.stack([_resize(im, self.config.size, nearest=False) for im in images])
        work_ids = torch.from_numpy(np.stack([_resize(c, self.config.size, nearest=True) for c in coded]))
        work_known = work_ids > 0
        cells = known_cells(work_known, self.factor, self.config.known_min_fraction).to(self.device)
        known_latents = encode_known(self.mask_autoencoder, work_ids, work_known,
                                     self.config.mask_scaling).to(self.dtype)
        image_latents = self.encode_images(work_images).repeat_interleave(len(coded) // len(images), dim=0)
        return ddim_sample(self.unet, self.scheduler, image_latents, steps or self.config.steps,
                           self._generator(seed), cells, known_latents,
                           resample=resample or self.config.resample)


def random_codes(count, rng):
    """Distinct random model ids in 1..127 for compact ids 1..count (entry 0 = void stays 0).

    The model was trained with ids drawn at random for every image (`data.random_ids`); the compact ids
    1, 2, 3, ... share most of their bits, so neighbouring known segments would look alike to it.
    """
    return np.concatenate([[0], 1 + rng.permutation(NUM_IDS - 1)[:count]]).astype(np.int64)


def codes_to_compact(ids, codes):
    """Map model ids to compact ids: a known segment's code to its compact id, any other id to a new one.

    New compact ids lie above the known ones (in increasing model-id order), so a segment the model adds
    never takes a known id.
    """
    lookup = np.zeros(NUM_IDS, np.int64)
    lookup[codes[1:]] = np.arange(1, len(codes))
    others = np.setdiff1d(np.unique(ids[ids > 0]), codes[1:])
    lookup[others] = len(codes) + np.arange(len(others))
    return lookup[ids]


def assign_known_ids(ids, known):
    """Give the segments of one sample the known labels inside them; known pixels keep theirs.

    ids, known: (H, W) in one id space (0 = void / unknown). A segment takes the label at least half of its
    known pixels carry. A known label that no segment took is an object the sample merged into a neighbour:
    the segment holding it is split among its own label and such labels, every pixel going to the nearest
    of their known pixels. Labels taken elsewhere only keep their known pixels, so a known block straddling
    a boundary does not claim the neighbour's segment.
    """
    held_by = {segment: np.unique(known[(ids == segment) & (known > 0)], return_counts=True)
               for segment in np.unique(ids[(known > 0) & (ids > 0)])}
    owner = {segment: labels[counts.argmax()] for segment, (labels, counts) in held_by.items()
             if counts.max() * 2 >= counts.sum()}
    taken = set(owner.values())
    out = ids.copy()
    for segment, (labels, _) in held_by.items():
        inside = ids == segment
        seeds = [label for label in labels if label not in taken or label == owner.get(segment)]
        held = np.where(inside & np.isin(known, seeds or labels), known, 0)
        out[inside] = fill_from_nearest(held)[inside]
    return np.where(known > 0, known, out)


def vote_samples(samples, known_ids, config):
    """Merge samples (K, H, W) of one image into one id map by per-pixel majority.

    Known ids mean the same object in every sample; ids the model added do not (each sample draws its own),
    so they vote as one 'added' class. Where that class wins, the first sample's added segments are kept;
    pixels the first sample gave a known id stay void, filled from the nearest id with `fill_void`.
    """
    samples = np.asarray(samples)
    added = (samples != 0) & ~np.isin(samples, known_ids)
    votes = np.where(added, -1, samples)
    candidates = np.unique(votes)
    winner = candidates[np.stack([(votes == c).sum(0) for c in candidates]).argmax(0)]
    merged = np.where(winner == -1, np.where(added[0], samples[0], 0), winner)
    return make_dense(merged, config.min_area) if config.fill_void else merged
