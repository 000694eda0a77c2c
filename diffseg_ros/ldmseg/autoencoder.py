"""The shallow mask autoencoder of LDMSeg (paper section 3.1; about 2 M parameters at paper widths).

Encoder: conv 7->c0, then one stage per factor 2 of downsampling (conv, SiLU, stride-2 conv, SiLU;
c0->c1->...), conv, GroupNorm, SiLU, conv -> 4 means + 4 log-variances.
Decoder: conv 4->D, (stages - 1) x [ConvTranspose x2, LayerNorm, SiLU], GroupNorm, SiLU, 1x1 conv -> 128
logits, x2 bilinear (the paper gives no kernel size for the last conv; 1x1 keeps the widest map cheap).
So logits come out at half the input resolution and the last factor 2 is bilinear, as in the paper
(f = 8: three stride-2 convs, two transposed convs, x2 bilinear); 1.76 M parameters at paper widths.

The mask latent must have the spatial size of the image latent, so the number of stride-2 stages follows
the image VAE's scale factor (f = 8 for SD 1.x: 3 stages; the embedded SynthWorld VAE has f = 4: 2 stages,
one transposed conv). No KL term: training uses weight decay instead (paper, eq. 2).

Initialisation (the paper gives none): the logits conv starts as a bit read-out, logit_k = s_k . (P h) with
s_k the +-1 bits of id k and P a random 7 x D projection, so the decoder starts out reading bits rather
than having to discover the 128-way code; with a default initialisation the cross-entropy fell from 4.9 to
4.1 in the first 100 steps on SynthWorld, with the read-out to 2.8.
"""
from dataclasses import asdict, dataclass
import math

import torch
import torch.nn.functional as F
from torch import nn

from .bits import NUM_BITS, NUM_IDS, ids_to_bits

PAPER_WIDTHS = (32, 64, 128, 256)


@dataclass
class MaskAutoencoderConfig:
    encoder_channels: tuple = PAPER_WIDTHS  # stage widths; one more entry than stride-2 stages
    decoder_channels: int = 256
    latent_channels: int = 4
    num_bits: int = NUM_BITS
    num_ids: int = NUM_IDS
    norm_groups: int = 32

    @property
    def downsample_stages(self):
        return len(self.encoder_channels) - 1

    @property
    def factor(self):
        """Spatial downsampling factor f (input size / latent size)."""
        return 2 ** self.downsample_stages

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data['encoder_channels'] = tuple(data['encoder_channels'])
        return cls(**data)

    @classmethod
    def for_factor(cls, factor, widths=PAPER_WIDTHS, **kwargs):
        """Config whose downsampling matches an image VAE with scale factor `factor` (first widths used)."""
        stages = int(round(math.log2(factor)))
        if 2 ** stages != factor or stages < 1 or stages + 1 > len(widths):
            raise ValueError(f'cannot build a mask encoder for factor {factor} with widths {widths}')
        return cls(encoder_channels=tuple(widths[:stages + 1]), **kwargs)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _groups(groups, channels):
    return math.gcd(groups, channels)


class MaskAutoencoder(nn.Module):
    """Bits (B, 7, H, W) -> latent (B, 4, H/f, W/f) -> logits over 128 ids (B, 128, H, W)."""

    def __init__(self, config=None):
        super().__init__()
        self.config = config or MaskAutoencoderConfig()
        c = self.config.encoder_channels
        latent, width = self.config.latent_channels, self.config.decoder_channels
        layers = [nn.Conv2d(self.config.num_bits, c[0], 3, padding=1), nn.SiLU()]
        for c_in, c_out in zip(c[:-1], c[1:]):
            layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.SiLU()]
        groups = _groups(self.config.norm_groups, c[-1])
        layers += [nn.Conv2d(c[-1], c[-1], 3, padding=1), nn.GroupNorm(groups, c[-1]), nn.SiLU(),
                   nn.Conv2d(c[-1], 2 * latent, 3, padding=1)]
        self.encoder = nn.Sequential(*layers)
        layers = [nn.Conv2d(latent, width, 3, padding=1)]
        for _ in range(self.config.downsample_stages - 1):
            layers += [nn.ConvTranspose2d(width, width, 2, stride=2), LayerNorm2d(width), nn.SiLU()]
        layers += [nn.GroupNorm(_groups(self.config.norm_groups, width), width), nn.SiLU(),
                   nn.Conv2d(width, self.config.num_ids, 1)]
        self.decoder = nn.Sequential(*layers)
        self._init_bit_readout()

    def _init_bit_readout(self):
        readout = self.decoder[-1]
        ids = torch.arange(self.config.num_ids).view(-1, 1, 1)
        patterns = ids_to_bits(ids, self.config.num_bits)[..., 0, 0]                 # (128, 7) of +-1
        projection = torch.randn(self.config.num_bits, readout.in_channels) / readout.in_channels ** 0.5
        with torch.no_grad():
            readout.weight.copy_((patterns @ projection)[..., None, None])
            readout.bias.zero_()

    def encode(self, bits):
        """Return (mean, log-variance) of the latent, each (B, 4, H/f, W/f)."""
        mean, logvar = self.encoder(bits).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latent, size=None):
        """Latent -> id logits at `size` (default: f x the latent size) via the final bilinear upsampling."""
        size = size or tuple(s * self.config.factor for s in latent.shape[-2:])
        return F.interpolate(self.decoder(latent), size=size, mode='bilinear', align_corners=False)

    def forward(self, bits, sample=True):
        """Reconstruct: encode, sample the latent (training) or take its mean, decode at the input size."""
        mean, logvar = self.encode(bits)
        latent = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(latent, bits.shape[-2:]), mean
