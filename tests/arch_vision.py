"""Vision and audio architectures with random weights (no download): torchvision and Hugging Face models.

``ARCHITECTURES[name].small(attn)`` builds a small model of the same architecture -- the same kinds of blocks
(and so of autograd nodes), fewer layers, narrower, at a small input (32×32 or 64×64 images, 400 audio samples,
a handful of patches or tokens) -- for the coverage tests; ``.full(attn)`` builds the model at the paper's real
size and input resolution (random weights), for benchmarks only (``benchmarks/coverage.py``). Both return
``(model, inputs, output_fn)`` with the model in eval mode; ``inputs`` is a tensor (torchvision) or a dict of
keyword arguments (Hugging Face), ``output_fn`` selects what is explained (None: the output or ``.logits``).

``attn`` is ``"sdpa"`` or ``"eager"`` for the Hugging Face models that offer both (``Arch.attn`` lists the modes
a model offers, ``(None,)`` for models without the choice). Every config is deep-copied before a model is built,
so the two modes never share a config object.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
SEED = 0


@dataclass(frozen=True)
class Arch:
    """``make(size, attn, generator)`` -> (model, inputs, output_fn), ``size`` being ``"small"`` or ``"full"``."""

    make: Callable[[str, str | None, torch.Generator], tuple[nn.Module, Any, Callable | None]]
    attn: tuple[str | None, ...] = (None,)

    def build(self, size: str, attn: str | None = None, seed: int = SEED):
        attn = attn or self.attn[0]
        if attn not in self.attn:
            raise ValueError(f"attention mode {attn!r} not offered; choose from {self.attn}")
        torch.manual_seed(seed)
        model, inputs, output = self.make(size, attn, torch.Generator().manual_seed(seed))
        return model.eval(), inputs, output

    def small(self, attn: str | None = None):
        return self.build("small", attn)

    def full(self, attn: str | None = None):
        return self.build("full", attn)


def _image(g, size: int, batch: int = BATCH, channels: int = 3):
    return torch.randn(batch, channels, size, size, generator=g)


def calibrate_batch_norm(model: nn.Module, inputs: Any) -> nn.Module:
    """Set every batch norm's statistics so that it rescales its input to unit mean square on ``inputs``.

    With random weights and the initial statistics (mean 0, variance 1) activations shrink or grow by orders of
    magnitude through a deep CNN (EfficientNet's outputs end near 1e-8), and a fixed ε is then no longer
    negligible; trained networks have statistics that normalise. The running mean stays 0 and the running
    variance becomes the mean square of the channel: a pure rescaling, because a non-zero mean would act as a
    bias (``-mean * weight / std``) that :func:`conservation.zero_biases` cannot remove, and ε-LRP through a biased
    layer is not conservative.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def hook(m, args):
        x = args[0]
        m.running_mean.zero_()
        m.running_var.copy_(x.pow(2).mean([0, *range(2, x.dim())]))

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for h in handles:
            h.remove()
    return model


# ----------------------------------------------------------------------------------------------------------
# torchvision


def _vgg16(size, attn, g):
    from torchvision.models import vgg16
    from torchvision.models.vgg import VGG, cfgs, make_layers

    if size == "full":
        return vgg16(weights=None), _image(g, 224, 1), None
    # the VGG16 layer plan at 1/16 of the width; the classifier keeps its Linear-ReLU-Dropout structure
    plan = [c if c == "M" else c // 16 for c in cfgs["D"]]
    model = VGG(make_layers(plan), num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return model, _image(g, 32), None


def _resnet50(size, attn, g):
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck, ResNet

    if size == "full":
        return resnet50(weights=None), _image(g, 224, 1), None
    x = _image(g, 32)
    return calibrate_batch_norm(ResNet(Bottleneck, [1, 2, 1, 1], num_classes=10, width_per_group=16), x), x, None


def _vit_b_16(size, attn, g):
    from torchvision.models import vit_b_16
    from torchvision.models.vision_transformer import VisionTransformer

    if size == "full":
        return vit_b_16(weights=None), _image(g, 224, 1), None
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=32**-0.5)  # torchvision starts the head at zero
    return model, _image(g, 32), None


def _efficientnet_v2_m(size, attn, g):
    from torchvision.models import efficientnet_v2_m
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, _efficientnet_conf

    if size == "full":
        return efficientnet_v2_m(weights=None), _image(g, 480, 1), None
    setting, _ = _efficientnet_conf("efficientnet_v2_m")

    def narrow(c):
        return max(8, (c // 4 + 7) // 8 * 8)

    small = [type(s)(s.expand_ratio, s.kernel, s.stride, narrow(s.input_channels), narrow(s.out_channels),
                     min(s.num_layers, 2)) for s in setting]
    assert isinstance(small[0], FusedMBConvConfig)
    model = EfficientNet(small, dropout=0.3, num_classes=10, last_channel=64,
                         norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3))
    # the squeeze-excitation gate x * sigmoid(fc2(silu(fc1(mean(x))))) is a product of two activations (uniform
    # rule): half of the relevance enters the gate's tiny network, whose pre-activations, with random weights and
    # zeroed biases, sit near 0, where the ε = 1e-12 rule of the exact check is ill-conditioned. Larger gate
    # weights keep them away from 0 (the model stays a valid EfficientNet).
    from torchvision.ops.misc import SqueezeExcitation

    x = _image(g, 32)
    model = calibrate_batch_norm(model, x)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqueezeExcitation):
                m.fc1.weight.mul_(100.0)
                m.fc2.weight.mul_(100.0)
    return model, x, None


def _swin_t(size, attn, g):
    from torchvision.models import swin_t
    from torchvision.models.swin_transformer import SwinTransformer

    if size == "full":
        return swin_t(weights=None), _image(g, 224, 1), None
    # 64×64 input: stages at 16, 8, 4, 2 patches, padded to the 7×7 window; shifted windows from the second block
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 4],
                            window_size=[7, 7], stochastic_depth_prob=0.2, num_classes=10)
    return model, _image(g, 64), None


def _convnext_tiny(size, attn, g):
    from torchvision.models import convnext_tiny
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    if size == "full":
        return convnext_tiny(weights=None), _image(g, 224, 1), None
    setting = [CNBlockConfig(16, 32, 2), CNBlockConfig(32, 64, 1), CNBlockConfig(64, 64, 1), CNBlockConfig(64, None, 2)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1, layer_scale=0.5, num_classes=10), _image(g, 64), None


def _densenet121(size, attn, g):
    from torchvision.models import densenet121
    from torchvision.models.densenet import DenseNet

    if size == "full":
        return densenet121(weights=None), _image(g, 224, 1), None
    model = DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2, num_classes=10)
    x = _image(g, 32)
    return calibrate_batch_norm(model, x), x, None


# ----------------------------------------------------------------------------------------------------------
# a U-Net with group norm and every kind of resampling, written here


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect")
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """Encoder-decoder with group norm, SiLU, strided / average-pool / pixel-unshuffle downsampling, and nearest,
    bilinear, bicubic, transposed-convolution and pixel-shuffle upsampling, replicate and zero padding to align
    skip connections, and a classifier on the pooled bottleneck and output maps."""

    def __init__(self, width: int = 16, groups: int = 4, classes: int = 10):
        super().__init__()
        w = self.width = width
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.enc1 = _ResBlock(w, w, groups)
        self.down1 = nn.Conv2d(w, w, 3, stride=2, padding=1)  # 1/2
        self.enc2 = _ResBlock(w, 2 * w, groups)
        self.enc3 = _ResBlock(8 * w, 2 * w, groups)  # after pixel unshuffle: 1/4
        self.mid = _ResBlock(2 * w, 2 * w, groups)  # after average pooling: 1/8
        self.up_t = nn.ConvTranspose2d(2 * w, 2 * w, 2, stride=2)  # 1/8 -> 1/4
        self.dec3 = _ResBlock(4 * w, 4 * w, groups)
        self.dec2 = _ResBlock(w + 2 * w + w, 2 * w, groups)
        self.skip0 = nn.Conv2d(w, w, 3)  # on the zero-padded skip connection
        self.dec1 = _ResBlock(2 * w + w, w, groups)
        self.norm_out = nn.GroupNorm(1, w)
        self.head = nn.Linear(w + 2 * w, classes)

    def forward(self, x):
        h0 = self.enc1(self.stem(x))
        h1 = self.enc2(self.down1(h0))
        h2 = self.enc3(F.pixel_unshuffle(h1, 2))
        m = self.mid(F.avg_pool2d(h2, 2))
        u = self.dec3(torch.cat([self.up_t(m), h2], 1))  # 1/4
        u = F.pixel_shuffle(u, 2)  # 1/2, channels 4w -> w
        h2_up = F.interpolate(h2, scale_factor=2, mode="bilinear", align_corners=False)[:, : self.width]
        u = torch.cat([u, h1, h2_up], 1)
        u = self.dec2(u)  # 1/2
        up = F.interpolate(u, scale_factor=2, mode="nearest")
        up = F.pad(up[..., :-1, :-1], (0, 1, 0, 1), mode="replicate")
        up = up + F.interpolate(u, size=h0.shape[-2:], mode="bicubic", align_corners=True)
        y = self.dec1(torch.cat([up, self.skip0(F.pad(h0, (1, 1, 1, 1)))], 1))
        y = F.silu(self.norm_out(y))
        pooled = torch.cat([y.mean((-2, -1)), F.adaptive_avg_pool2d(m, 1).flatten(1)], 1)
        return self.head(pooled)


def _unet_groupnorm(size, attn, g):
    if size == "full":
        return TinyUNet(width=64, groups=32, classes=1000), _image(g, 256, 1), None
    return TinyUNet(), _image(g, 16), None


# ----------------------------------------------------------------------------------------------------------
# Hugging Face


def _hf(model_cls: str, config_cls: str, kw: dict, attn: str | None, **config_kw):
    import transformers

    cfg = getattr(transformers, config_cls)(**copy.deepcopy(kw), **config_kw)
    extra = {} if attn is None else {"attn_implementation": attn}
    return getattr(transformers, model_cls)._from_config(copy.deepcopy(cfg), **extra)


def _pooled(o):
    return o.pooler_output


def _last_logits(o):
    return o.logits[:, -1]


def _mean_logits(o):
    return o.logits.mean((-2, -1))


def _siglip2_vision(size, attn, g):
    """SigLIP-2 NaFlex vision tower: patches, a learned 2-D position grid resized per image (anti-aliased bilinear
    interpolation), padded patches masked, attention-pooling head (``nn.MultiheadAttention``)."""
    if size == "full":  # google/siglip2-so400m-patch16-naflex (27 layers: with eager attention 2,142 nodes here,
        # the paper's table counts 2,178)
        kw = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_patches=256, patch_size=16)
        shapes = [(16, 16)]
    else:
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_patches=16, patch_size=4)
        shapes = [(4, 4), (3, 4)]  # the second image has fewer patches: resized positions, padding mask
    model = _hf("Siglip2VisionModel", "Siglip2VisionConfig", kw, attn)
    n, dim = kw["num_patches"], 3 * kw["patch_size"] ** 2
    mask = torch.zeros(len(shapes), n, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    inputs = dict(pixel_values=torch.randn(len(shapes), n, dim, generator=g), pixel_attention_mask=mask,
                  spatial_shapes=torch.tensor(shapes))
    return model, inputs, _pooled


def _siglip_vision(size, attn, g):
    if size == "full":
        kw = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16)
    else:
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    batch = 1 if size == "full" else BATCH
    return (_hf("SiglipVisionModel", "SiglipVisionConfig", kw, attn),
            dict(pixel_values=_image(g, kw["image_size"], batch)), _pooled)


def _clip_vision(size, attn, g):
    if size == "full":  # ViT-B/32
        kw = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32)
    else:
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    batch = 1 if size == "full" else BATCH
    return (_hf("CLIPVisionModel", "CLIPVisionConfig", kw, attn),
            dict(pixel_values=_image(g, kw["image_size"], batch)), _pooled)


# the settings of XLS-R that change the graph: layer-norm feature extractor with conv biases, pre-norm
# ("stable layer norm") transformer, weight-normalised positional convolution
_XLS_R = dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True, feat_extract_activation="gelu")


def _wav2vec2_xls_r(size, attn, g):
    if size == "full":  # facebook/wav2vec2-xls-r-300m with a CTC head, 1 s of 16 kHz audio
        kw = dict(vocab_size=32, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
                  conv_kernel=(10, 3, 3, 3, 3, 2, 2), num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
        audio = torch.randn(1, 16000, generator=g)
    else:
        kw = dict(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=8,
                  num_conv_pos_embedding_groups=4)
        audio = torch.randn(BATCH, 400, generator=g)
    model = _hf("Wav2Vec2ForCTC", "Wav2Vec2Config", kw, attn, **_XLS_R)
    return model, dict(input_values=audio), None  # every frame's arg-max (a CTC transcription)


def _whisper_small(size, attn, g):
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    if size == "full":
        kw = dict(vocab_size=51865, num_mel_bins=80, encoder_layers=12, decoder_layers=12, d_model=768,
                  encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                  max_source_positions=1500, max_target_positions=448)
        batch, dec_len = 1, 4
    else:
        # init_std = d_model^-1/2 keeps activations O(1) in this narrow model; with the default 0.02 (made for
        # d_model >= 384) the convolution outputs are ~1e-2 against sinusoidal position embeddings of ~1, and the
        # ε-rule at their addition amplifies relevance ~1e4-fold, so that ε = 1e-12 is no longer negligible
        kw = dict(vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  max_source_positions=16, max_target_positions=16, init_std=32**-0.5)
        batch, dec_len = BATCH, 4
    model = _hf("WhisperForConditionalGeneration", "WhisperConfig", kw, attn, **ids)
    frames = 2 * kw["max_source_positions"]  # the encoder's two convolutions halve the mel frames
    dec = torch.randint(3, kw["vocab_size"], (batch, dec_len), generator=g)
    dec[:, 0] = 1
    inputs = dict(input_features=torch.randn(batch, kw["num_mel_bins"], frames, generator=g), decoder_input_ids=dec)
    return model, inputs, _last_logits


def _pix2struct_deplot(size, attn, g):
    """Pix2Struct (DePlot: the base model's shape): variable-resolution patches with row / column ids, T5-style
    encoder and decoder with relative position buckets in the decoder."""
    if size == "full":  # google/deplot
        text = dict(vocab_size=50244, hidden_size=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12)
        vision = dict(hidden_size=768, patch_embed_hidden_size=768, d_ff=2048, d_kv=64, num_hidden_layers=12,
                      num_attention_heads=12, patch_size=16)
        batch, rows, cols, dec_len = 1, 16, 32, 4
    else:
        text = dict(vocab_size=64, hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16)
        vision = dict(hidden_size=32, patch_embed_hidden_size=48, d_ff=64, d_kv=8, num_hidden_layers=2,
                      num_attention_heads=4, patch_size=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=16)
        batch, rows, cols, dec_len = BATCH, 2, 3, 4
    import transformers

    cfg = transformers.Pix2StructConfig(text_config=copy.deepcopy(text), vision_config=copy.deepcopy(vision),
                                        is_vqa=True)
    extra = {} if attn is None else {"attn_implementation": attn}
    model = transformers.Pix2StructForConditionalGeneration._from_config(copy.deepcopy(cfg), **extra)
    n = rows * cols + (2 if size == "small" else 0)  # small: two padding patches at the end
    patches = torch.randn(batch, n, 2 + vision["patch_embed_hidden_size"], generator=g)
    row = torch.arange(rows).repeat_interleave(cols) + 1
    col = torch.arange(cols).repeat(rows) + 1
    mask = torch.zeros(batch, n, dtype=torch.long)  # integer: a float mask would be explained as an input
    mask[:, : rows * cols] = 1
    patches[:, : rows * cols, 0], patches[:, : rows * cols, 1] = row.float(), col.float()
    patches[:, rows * cols:] = 0  # padding patches are all zero, as the processor makes them
    if batch > 1:
        mask[1:, rows * cols - cols:] = 0  # the second image has one row fewer
        patches[1:, rows * cols - cols:] = 0
    dec = torch.randint(3, text["vocab_size"], (batch, dec_len), generator=g)
    dec[:, 0] = 0  # decoder_start_token_id
    return model, dict(flattened_patches=patches, attention_mask=mask, decoder_input_ids=dec), _last_logits


def _upernet_convnext(size, attn, g):
    """UperNet semantic segmentation on a ConvNeXt backbone: pyramid pooling (adaptive average pooling to 1, 2, 3,
    6), bilinear upsampling, batch norm; explained: the image-averaged class scores."""
    import transformers

    if size == "full":
        backbone = transformers.ConvNextConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
        kw, image = dict(hidden_size=512, auxiliary_in_channels=384), _image(g, 512, 1)
    else:
        backbone = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                               out_features=["stage1", "stage2", "stage3", "stage4"])
        kw, image = dict(hidden_size=16, auxiliary_in_channels=24, auxiliary_channels=8, num_labels=5), _image(g, 64)
    cfg = transformers.UperNetConfig(backbone_config=backbone, **kw)
    model = transformers.UperNetForSemanticSegmentation(copy.deepcopy(cfg))
    return model, dict(pixel_values=image), _mean_logits


ARCHITECTURES: dict[str, Arch] = {
    "vgg16": Arch(_vgg16),
    "resnet50": Arch(_resnet50),
    "vit_b_16": Arch(_vit_b_16),
    "efficientnet_v2_m": Arch(_efficientnet_v2_m),
    "siglip2_vision": Arch(_siglip2_vision, attn=("sdpa", "eager")),
    "wav2vec2_xls_r": Arch(_wav2vec2_xls_r, attn=("sdpa", "eager")),
    "whisper_small": Arch(_whisper_small, attn=("sdpa", "eager")),
    "pix2struct_deplot": Arch(_pix2struct_deplot, attn=("eager",)),  # transformers offers no SDPA for Pix2Struct
    "swin_t": Arch(_swin_t),
    "convnext_tiny": Arch(_convnext_tiny),
    "densenet121": Arch(_densenet121),
    "siglip_vision": Arch(_siglip_vision, attn=("sdpa", "eager")),
    "clip_vision": Arch(_clip_vision, attn=("sdpa", "eager")),
    "unet_groupnorm": Arch(_unet_groupnorm),
    "upernet_convnext": Arch(_upernet_convnext, attn=(None,)),
}
