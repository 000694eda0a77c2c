"""Model folders on disk: where they are, whether they are complete, what precision to load them in.

Used by every loader (Stable Diffusion components, LDMSeg), so a missing file is always reported the same
way: one line naming the folder and every missing part. Nothing is ever downloaded.
"""
from dataclasses import dataclass
import os
import sys

import torch

from .settings import setting, Settings

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'embedded')


class ModelLoadError(RuntimeError):
    """A model folder is missing or incomplete; the message names what is missing."""


@dataclass
class ModelConfig(Settings):
    """Where an engine's model comes from and how it runs; the first settings of every engine config."""

    model_path: str = setting('', "local model folder (diffusers Stable Diffusion for diffseg, LDMSeg for "
                                  "ldmseg); '' = the embedded SynthWorld model")
    device: str = setting('cpu', 'torch device for the model', constraint="'cpu' or 'cuda[:N]'")
    dtype: str = setting('float32', 'model weights precision: float16 on CUDA (the recommended GPU setting), '
                                    'bfloat16 on CPU (~2x faster than float32 there)', choices=tuple(DTYPES))
    channels_last: bool = setting(False, 'UNet and VAE in channels-last (NHWC) memory format, which CUDA '
                                         'tensor-core convolutions prefer in float16; results equal up to '
                                         'rounding')
    compile: bool = setting(False, "torch.compile the UNet and the VAE encoder (inductor; diffseg's "
                                   'attention capture is compiled with the UNet): faster frames on CUDA, '
                                   'after a compile at start (minutes for SD 1.5) and again for each new '
                                   'input shape or set of captured layers; needs a C++ compiler (and '
                                   'Triton on CUDA)')

    def invariants(self):
        kind = self.device.split(':')[0]
        yield kind in ('cpu', 'cuda'), f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}"
        yield (kind != 'cuda' or torch.cuda.is_available(),
               f'device is {self.device} but no CUDA device is available')


def resolve_model_path(model_path, embedded):
    """Map '' to the embedded model folder `embedded` (a name under embedded/); expand ~, make absolute."""
    if not model_path:
        return os.path.join(EMBEDDED_DIR, embedded)
    return os.path.abspath(os.path.expanduser(model_path))


def needs(*files, label=None):
    """Require all `files`; `label` names the requirement when missing (default: the files)."""
    return (label, (tuple(files),))


def needs_any(*alternatives, label=None):
    """Require any one group of files; `alternatives` are tuples of relative paths."""
    return (label, tuple(tuple(group) for group in alternatives))


def missing_parts(path, requirements):
    """List what a folder lacks ([] when complete); requirements come from `needs` / `needs_any`."""
    if not os.path.isdir(path):
        return [f'folder {path}']
    missing = []
    for label, alternatives in requirements:
        absent = [[f for f in group if not os.path.isfile(os.path.join(path, f))] for group in alternatives]
        if all(absent):
            missing += [label] if label else absent[0]
    return missing


def require_complete(path, requirements, what):
    """Raise ModelLoadError naming every missing part of a `what` folder (e.g. 'Stable Diffusion')."""
    missing = missing_parts(path, requirements)
    if missing:
        raise ModelLoadError(f'{what} folder {path} is incomplete; missing: {", ".join(missing)}')


def quiet_model_libraries():
    """For programs (node, CLI), before the model libraries load: no hub access, no loading chatter.

    Loading already reads local files only; this also keeps a robot's console free of progress bars.
    """
    for name, value in (('HF_HUB_OFFLINE', '1'), ('HF_HUB_DISABLE_PROGRESS_BARS', '1'),
                        ('DIFFUSERS_VERBOSITY', 'error'), ('TRANSFORMERS_VERBOSITY', 'error')):
        os.environ.setdefault(name, value)
    for name in ('diffusers', 'transformers'):     # already imported: tell them directly
        if name in sys.modules:
            sys.modules[name].utils.logging.set_verbosity_error()
            sys.modules[name].utils.logging.disable_progress_bar()


def apply_model_settings(config, convolutional=(), compiled=()):
    """Apply a ModelConfig's memory format and compile choices to an engine's modules, in place.

    `convolutional`: modules whose weights go channels-last; `compiled`: modules compiled with
    `nn.Module.compile`, which keeps the module object, so hooks and attention processors installed on
    its submodules later still take effect. Safe to call again on the same modules.
    """
    if config.channels_last:
        for module in convolutional:
            module.to(memory_format=torch.channels_last)
    if config.compile:
        for module in compiled:
            module.compile()


def torch_dtype(name):
    """Return the torch dtype of 'float32' / 'float16' / 'bfloat16'; ValueError for another name."""
    if name not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {name!r}')
    return DTYPES[name]
