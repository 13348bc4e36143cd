"""A backbone's preprocessors without its weights: the tokenizer and the image transform.

The trainer sets up config → preprocessors → data → model, so the data pipeline can start before (and without)
the backbone's weights; `load_backbone` takes its tokenizer from `load_tokenizer`, so both get the same one.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from unipt_scale.backbone import BackboneLoadError, _custom_code_error, _resolve_path, inspect_backbone
from unipt_scale.config import BackboneConfig

PROCESSOR_FILE = "preprocessor_config.json"


def load_tokenizer(cfg: BackboneConfig, trust_remote_code: bool = False):
    """The backbone's tokenizer (None for vision backbones), with a pad token and the configured padding side.

    Reads config.json (for the kind and the padding-side check) and the tokenizer files; never the weights.
    """
    from transformers import AutoTokenizer

    spec = inspect_backbone(cfg, trust_remote_code)
    if spec.kind == "vision" or not spec.path:
        return None
    remote = dict(trust_remote_code=True) if trust_remote_code else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, **remote)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in str(err):
            raise _custom_code_error(spec.path, f"its tokenizer: {first}") from None
        raise BackboneLoadError(f"no tokenizer could be loaded from {spec.path!r} ({first}); the directory needs the "
                                "tokenizer files saved next to the model") from None
    if tokenizer.pad_token is None:
        # Ours to change: GPT-style tokenizers have no pad token, and padded positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right" if cfg.padding_side == "auto" else cfg.padding_side
    return tokenizer


def _processor_file(path: str) -> Optional[str]:
    if os.path.isdir(path):
        f = os.path.join(path, PROCESSOR_FILE)
        return f if os.path.isfile(f) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, PROCESSOR_FILE)
    except Exception:  # not a valid repo id: nothing cached for it
        return None
    return found if isinstance(found, str) else None


def _shortest_edge_only(processor) -> bool:
    """Whether a processor's resize fixes only the shortest edge (no height and width to set)."""
    size = getattr(processor, "size", None)
    if size is None:
        return False
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    return get("shortest_edge") is not None and get("height") is None and get("width") is None


class ProcessorImageTransform:
    """PIL image → float (C, size, size) tensor through a backbone's own image processor.

    The processor's resize, rescale and normalisation (its mean/std) are kept; only the output size is set, to
    the data's image size. `resize="stretch"` resizes the whole image to the square itself and lets the processor
    only rescale and normalise: nothing is cropped (a task whose labels are positions in the image needs that).
    A class, not a closure, so it pickles into spawned data workers.
    """

    def __init__(self, processor, image_size: int, resize: str = "crop"):
        if resize not in ("crop", "stretch"):
            raise ValueError("resize must be 'crop' or 'stretch'")
        self.processor = processor
        self.image_size = int(image_size)
        self.resize = resize
        mean = getattr(processor, "image_mean", None)
        self.mode = "L" if isinstance(mean, (list, tuple)) and len(mean) == 1 else "RGB"
        s = self.image_size
        crops = getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None) is not None
        if not crops and getattr(processor, "crop_pct", None) is None and _shortest_edge_only(processor):
            # ViLT's processor: the shortest edge to a size and the other edge free, which a batch of squares
            # cannot hold; the whole image is stretched to the square instead.
            self.resize = resize = "stretch"
        if resize == "stretch":
            self.kwargs = dict(do_resize=False, do_center_crop=False)
        elif crops:
            self.kwargs = dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        elif getattr(processor, "crop_pct", None) is not None:  # ConvNeXt-style: shortest edge, then crop_pct
            self.kwargs = dict(size={"shortest_edge": s})
        else:
            self.kwargs = dict(size={"height": s, "width": s})

    def __call__(self, img) -> torch.Tensor:
        if img.mode != self.mode:
            img = img.convert(self.mode)
        if self.resize == "stretch":
            from PIL import Image

            img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        out = self.processor(images=img, return_tensors="pt", **self.kwargs)["pixel_values"]
        return out[0].float()


def load_image_transform(cfg: BackboneConfig, image_size: int, trust_remote_code: bool = False,
                         resize: str = "crop") -> Optional[Callable]:
    """The backbone's own image preprocessing where its directory has preprocessor_config.json, else None
    (the data layer then uses its default). Loads no weights. `resize`: see ProcessorImageTransform."""
    from transformers import AutoImageProcessor

    if image_size < 1:
        raise BackboneLoadError(f"image size {image_size} is not positive; set data.image_size to the side of the "
                                "square images the backbone should see")
    path, builtin_module = _resolve_path(cfg)
    if builtin_module is not None or _processor_file(path) is None:
        return None
    remote = dict(trust_remote_code=True) if trust_remote_code else {}
    try:
        processor = AutoImageProcessor.from_pretrained(path, **remote)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in str(err):
            raise _custom_code_error(path, f"its image processor: {first}") from None
        raise BackboneLoadError(f"{path!r} has {PROCESSOR_FILE} but no image processor could be built from it "
                                f"({first}); fix or remove that file") from None
    transform = ProcessorImageTransform(processor, image_size, resize)
    from PIL import Image

    probe = transform(Image.new("RGB", (2 * image_size + 3, 2 * image_size + 1)))
    if tuple(probe.shape[-2:]) != (image_size, image_size):
        raise BackboneLoadError(f"the image processor of {path!r} ({type(processor).__name__}) gives "
                                f"{tuple(probe.shape)} images, not {image_size}x{image_size}; set data.image_size "
                                f"to what it makes or remove {PROCESSOR_FILE} for the default transform")
    return transform
