"""Learning a concept from the robot's camera: request parsing, crop collection, job state (ROS-free).

A request "my mug = mug" names the concept and its class word; "my mug, mug of mine = mug" also gives
the concept aliases (any name a query may use). The job crops the class word's segment
out of the next N frames, then trains (Custom Diffusion) on the crops; its status is a JSON-ready dict:
state queued -> collecting -> training -> done, or failed at any point, with an overall progress 0..1.
"cancel" ends the active job (failed, 'cancelled by request'); an ended job never changes again.
`LearnFlow` runs that sequence for an engine (QueryEngine): requests from any thread, collection on the
engine's thread, training in a thread of its own, installation back on the engine's thread.
"""
from dataclasses import dataclass
import itertools
import threading
import time

import numpy as np
from scipy import ndimage

from .concept_learning import LearnSettings
from .concepts import ConceptError, next_free_token, normalise_name, safe_folder_name, save_concept
from .settings import section, setting, Settings
from .text_limits import MAX_LOG_CHARS

MAX_REQUEST_CHARS = 200
MAX_NAME_CHARS = 100
MAX_CLASS_CHARS = 50
MIN_CROP_PIXELS = 16
COLLECT_SHARE = 0.2     # share of the progress bar for collecting; training has the rest
CANCEL_REQUEST = 'cancel'


@dataclass
class LearnConfig(Settings):
    frames: int = setting(5, 'frames whose class-word segment is cropped for a learn request', low=1,
                          high=100)
    margin: float = setting(0.15, 'margin around the segment box of a crop, as a fraction of its size',
                            low=0.0, high=2.0)
    timeout: float = setting(60.0, 'seconds to wait for the frames of a learn request', low=1.0, high=3600.0)
    training: LearnSettings = section(LearnSettings, '')


class LearnRequestError(ValueError):
    """A learn request refused before anything changes."""


class LearnCancelled(Exception):
    """Training stopped because the node shuts down."""


@dataclass
class LearnRequest:
    name: str
    class_word: str
    text: str
    aliases: tuple = ()


def _quoted(text):
    """Return the first MAX_LOG_CHARS characters of a refused request, cleaned, for its status and the log."""
    head = _clean(text[:MAX_LOG_CHARS])
    return head if len(text) <= MAX_LOG_CHARS else f'{head}... ({len(text)} characters)'


def _clean(text):
    return ' '.join(''.join(ch if ch.isprintable() else ' ' for ch in str(text)).split())


def is_cancel_request(text):
    return len(text) <= MAX_LOG_CHARS and _clean(text).lower() == CANCEL_REQUEST


def parse_learn_request(text):
    """Parse 'my mug[, alias ...] = mug' (names = class word); raise LearnRequestError on bad text."""
    if len(text) > 4 * MAX_REQUEST_CHARS:   # refused before any work on it: a 1 MB request is cheap to send
        raise LearnRequestError(f'learn request of {len(text)} characters refused '
                                f'(limit {MAX_REQUEST_CHARS})')
    cleaned = _clean(text)
    if len(cleaned) > MAX_REQUEST_CHARS:
        raise LearnRequestError(f'learn request longer than {MAX_REQUEST_CHARS} characters')
    parts = [part.strip() for part in cleaned.split('=')]
    names = [n.strip() for n in parts[0].split(',')] if len(parts) == 2 else []
    if len(parts) != 2 or not parts[1] or not names or not all(names):
        raise LearnRequestError(f"learn request {cleaned!r} must be 'name = class word', e.g. 'my mug = mug' "
                                "(or 'my mug, mug of mine = mug' with aliases)")
    class_word = parts[1]
    if len(class_word) > MAX_CLASS_CHARS or any(len(n) > MAX_NAME_CHARS for n in names):
        raise LearnRequestError(f'name (max {MAX_NAME_CHARS} characters) or class word '
                                f'(max {MAX_CLASS_CHARS}) too long')
    for name in names:
        if normalise_name(name) == normalise_name(class_word):
            raise LearnRequestError(f'the name {name!r} must differ from its class word, or every plain '
                                    f'{class_word!r} query would mean the concept')
        if any(ch in name for ch in '<>;'):
            raise LearnRequestError(f'name {name!r} may not hold <, > or ;')
    if any(ch in class_word for ch in '<>;'):
        raise LearnRequestError(f'class word {class_word!r} may not hold <, > or ;')
    try:
        safe_folder_name(names[0])
    except ConceptError as err:
        raise LearnRequestError(str(err)) from None
    return LearnRequest(names[0], class_word, cleaned, tuple(names[1:]))


def crop_segment(rgb, mask, margin=0.15, min_pixels=MIN_CROP_PIXELS):
    """Crop the box of the mask's largest 8-connected piece plus a margin (x its size); None if too small."""
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count == 0:
        return None
    sizes = np.bincount(pieces.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < min_pixels:
        return None
    rows, cols = np.nonzero(pieces == biggest)
    pad_y = int(round(margin * (rows.max() - rows.min() + 1)))
    pad_x = int(round(margin * (cols.max() - cols.min() + 1)))
    top, bottom = max(0, rows.min() - pad_y), min(mask.shape[0], rows.max() + 1 + pad_y)
    left, right = max(0, cols.min() - pad_x), min(mask.shape[1], cols.max() + 1 + pad_x)
    return np.ascontiguousarray(rgb[top:bottom, left:right])


class LearnJob:
    """State of one learn request; the node's worker and training thread update it, status() reports it."""

    ACTIVE = ('queued', 'collecting', 'training')

    def __init__(self, job_id, request, frames, text=''):
        self.id = job_id
        self.request = request            # None for a request refused while parsing
        self.text = request.text if request else _quoted(text)   # any size: only its start is kept
        self.frames = frames              # frames to look at
        self.seen = 0
        self.crops = []
        self.views = []                   # (frame, class-word mask) of every frame a crop came from
        self.appearance = None            # Prototypes from the views, saved with the concept
        self.state = 'queued'
        self.progress = 0.0
        self.message = f'waiting to look at the next {frames} frames'
        self.started = None
        self.concept = None               # the learned Concept once trained
        self.cancelled = False
        self._lock = threading.Lock()

    @classmethod
    def refused(cls, job_id, text, reason):
        """Make a job failed from the start (bad request text, busy, nowhere to save)."""
        job = cls(job_id, None, 0, text)
        job.fail(reason)
        return job

    @property
    def active(self):
        return self.state in self.ACTIVE

    def status(self):
        """Return the JSON-ready status of the job."""
        with self._lock:
            return {'id': self.id, 'request': self.text,
                    'name': self.request.name if self.request else None,
                    'class_word': self.request.class_word if self.request else None,
                    'state': self.state, 'progress': round(self.progress, 3), 'message': self.message,
                    'frames': self.seen, 'crops': len(self.crops)}

    def _set(self, state, progress, message):
        with self._lock:
            if self.state in ('done', 'failed'):    # ended (e.g. cancelled while the worker was busy)
                return
            self.state, self.progress, self.message = state, progress, message

    def cancel(self):
        """End an active job at the planner's request; return False if it had already ended."""
        with self._lock:
            if self.state not in self.ACTIVE:
                return False
            self.cancelled = True
            self.state, self.message = 'failed', 'cancelled by request'
        return True

    def start_collecting(self, now=None):
        self.started = time.monotonic() if now is None else now
        word = self.request.class_word
        self._set('collecting', 0.0, f'looking for {word!r} in the next {self.frames} frames')

    def add_frame(self, rgb, mask, margin=0.15):
        """Crop the class word's segment of one frame; after the last frame move on to training or fail."""
        crop = crop_segment(rgb, mask, margin)
        with self._lock:
            self.seen += 1
            if crop is not None:
                self.crops.append(crop)
                self.views.append((rgb, mask))   # whole frames: prototypes see the object at the node's scale
        word = self.request.class_word
        if self.seen < self.frames:
            self._set('collecting', COLLECT_SHARE * self.seen / self.frames,
                      f'{len(self.crops)} crops of {word!r} from {self.seen}/{self.frames} frames')
        elif self.crops:
            self._set('training', COLLECT_SHARE, f'training on {len(self.crops)} crops of {word!r}')
        else:
            self.fail(f'no segment of {word!r} found in {self.frames} frames')

    def expired(self, timeout, now=None):
        """Return True while collecting for longer than timeout seconds."""
        now = time.monotonic() if now is None else now
        return self.state == 'collecting' and self.started is not None and now - self.started > timeout

    def training_step(self, step, steps, loss):
        self._set('training', COLLECT_SHARE + (1 - COLLECT_SHARE) * step / max(steps, 1) * 0.99,
                  f'training step {step}/{steps}, loss {loss:.4f}')

    def finish(self, message):
        self._set('done', 1.0, message)

    def fail(self, message):
        self._set('failed', self.progress, message)


def train_job(job, trainer, concepts_dir, token, settings, report=None, cancelled=lambda: False,
              report_every=None):
    """Train the job's concept on its crops and save it atomically in concepts_dir; returns the Concept.

    Nothing is written unless training succeeds (a failed learn leaves the directory as it was).
    report() is called every report_every steps (default: about 20 reports); cancelled() stops training
    with LearnCancelled.
    """
    every = report_every or max(1, settings.steps // 20)

    def progress(step, steps, loss):
        if cancelled():
            raise LearnCancelled()
        job.training_step(step, steps, loss)
        if report is not None and (step % every == 0 or step == steps):
            report()
    request = job.request
    concept = trainer.learn(job.crops, request.name, request.class_word, None, aliases=request.aliases,
                            token=token, settings=settings, progress=progress, show_progress=False)
    if cancelled():
        raise LearnCancelled()
    concept.appearance = job.appearance
    save_concept(concept, concepts_dir)
    job.concept = concept
    return concept


class LearnFlow:
    """Learning from the camera for one engine: request -> collecting -> training -> installed.

    `request` may be called from any thread (it parses and queues); `step` and `take_trained` run on the
    engine's thread (they use the model); training runs in a thread of its own on private copies of the
    text path, so segmentation goes on. `on_status(job)` is called on every change of the active job;
    `wake()` when a trained concept waits to be installed.
    """

    def __init__(self, config, concepts_dir, on_status=None, wake=None):
        self.config, self.concepts_dir = config, concepts_dir
        self.on_status = on_status or (lambda job: None)
        self.wake = wake or (lambda: None)
        self.job = None                   # the latest LearnJob
        self.thread = None
        self.closed = False
        self._ids = itertools.count(1)
        self._trained = None              # a job whose concept is saved and waits to be installed

    @property
    def collecting(self):
        return self.job is not None and self.job.state == 'collecting'

    def request(self, text):
        """Queue a learn request like "my mug = mug", or refuse it at once; "cancel" ends the active job."""
        job_id = next(self._ids)
        if is_cancel_request(text):
            job = self.job
            if job is None or not job.cancel():
                job = LearnJob.refused(job_id, text, 'nothing to cancel: no learn request active')
            self.on_status(job)           # a training thread stops at its next step, saving nothing
            return job
        try:
            request = parse_learn_request(text)
            if not self.concepts_dir:
                raise LearnRequestError('concepts_dir is not set: learned concepts have nowhere to go')
            if self.job is not None and self.job.active:
                raise LearnRequestError(f'busy: still learning {self.job.request.name!r} '
                                        f'(request {self.job.id})')
        except LearnRequestError as err:
            job = LearnJob.refused(job_id, text, str(err))
            self.on_status(job)
            return job
        self.job = LearnJob(job_id, request, self.config.frames)
        self.on_status(self.job)
        return self.job

    def step(self, engine, rgb=None, now=None):
        """Advance the active job on the engine's thread: start collecting, crop a frame, time out."""
        job = self.job
        if job is None:
            return
        if job.state == 'queued':
            try:
                engine.check_new_concept(job.request.name, job.request.aliases)
            except ConceptError as err:
                job.fail(str(err))
            else:
                job.start_collecting(now)
            self.on_status(job)
        if rgb is not None and job.state == 'collecting':
            self._collect(engine, job, rgb)
        if job.expired(self.config.timeout, now):
            job.fail(f'only {job.seen} of {job.frames} frames arrived within {self.config.timeout:.0f} s')
            self.on_status(job)

    def _collect(self, engine, job, rgb):
        try:
            job.add_frame(rgb, engine.class_mask(rgb, job.request.class_word), self.config.margin)
            if job.state == 'training':
                job.appearance = engine.prototypes(job.views, job.request.class_word)
                trainer = engine.trainer()   # built between frames; it trains on private copies
                self.thread = threading.Thread(target=self._train, args=(job, trainer), name='diffseg-learn',
                                               daemon=True)
                self.thread.start()
        except Exception as err:
            job.fail(f'collecting failed: {type(err).__name__}: {err}')
        self.on_status(job)

    def _train(self, job, trainer):
        """Training thread: train and save the concept, then let the engine's thread install it."""
        try:
            train_job(job, trainer, self.concepts_dir, next_free_token(self.concepts_dir, job.request.name),
                      self.config.training, report=lambda: self.on_status(job),
                      cancelled=lambda: self.closed or job.cancelled)
        except LearnCancelled:
            return
        except Exception as err:   # nothing was saved: existing concepts are untouched
            job.fail(f'training failed: {type(err).__name__}: {err}')
            self.on_status(job)
            return
        self._trained = job
        self.wake()

    def take_trained(self):
        """Return the job whose concept was saved and waits to be installed (once), else None."""
        job, self._trained = self._trained, None
        return job

    def close(self):
        """Stop training at its next step (nothing is saved)."""
        self.closed = True
        if self.thread is not None:
            self.thread.join(timeout=10.0)
