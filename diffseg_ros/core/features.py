"""UNet features of the frame's single forward: outputs of named modules, caught by forward hooks.

    with FeatureCapture(unet, ['up_blocks.1']) as capture:
        unet(latents, t, encoder_hidden_states=text)
    capture.features['up_blocks.1']          # [B, C, h, w] float32

Nothing is recomputed: the hooks keep the tensors the forward produces anyway. `Segmenter.attend` opens one
beside its `AttentionCapture`, so the appearance prototypes (DIFT-style decoder features) and the IOSD head
read features and attention of the same pass.
"""


class FeatureCapture:
    """Context manager: forward hooks storing the outputs [B, C, h, w] of named UNet modules (float32)."""

    def __init__(self, unet, names):
        self.unet, self.names = unet, tuple(names)
        self.features = {}
        self._hooks = []

    def __enter__(self):
        modules = dict(self.unet.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f'the UNet has no module {missing[0]!r} to read features from')
        self.features = {}
        for name in self.names:
            self._hooks.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def store(module, inputs, output):
            value = output[0] if isinstance(output, (tuple, list)) else output
            self.features[name] = value.detach().float()
        return store

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return False
