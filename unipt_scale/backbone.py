"""The frozen backbone: one way to load it, freeze it and read its per-layer hidden states.

The backbone always runs in eval mode under `torch.no_grad()`: its hidden states reach the side network as
plain tensors with no autograd history, so nothing inside it is kept for backward and it never gets gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from unipt_scale.assets import (BUILTIN_MODULES, EFFICIENTNET_LITE0_STAGES, AssetError, resolve_builtin)
from unipt_scale.config import BackboneConfig, ConfigError

DECODER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gptj", "phi", "phi3",
                 "gemma", "gemma2", "gemma3_text", "falcon", "opt", "bloom", "olmo", "olmo2", "smollm3", "granite"}
# ViT-like towers: every hidden state is (B, tokens, hidden_size). Hierarchical ones (Swin, ConvNeXt) change width
# per stage; wrap them with wrap_module and the feature-map variant instead.
VISION_TYPES = {"vit", "clip_vision_model", "siglip_vision_model", "dinov2", "deit", "beit"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneLoadError(RuntimeError):
    pass


@dataclass
class BackboneOutput:
    hidden_states: List[torch.Tensor]  # the tapped layers, (B, N, D_i) or (B, C_i, H_i, W_i)
    mask: Optional[torch.Tensor]  # (B, N) bool, True for real tokens; None when every position is real
    final: torch.Tensor  # the backbone's own output that UniPT's residual adds to


ENCODER_DECODER_TYPES = {"t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus"}


def detect_kind(config) -> str:
    # An encoder-only T5 checkpoint (T5EncoderModel) says is_encoder_decoder=False, yet AutoModel builds the
    # full T5Model for it; the model type decides.
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "model_type", "") in ENCODER_DECODER_TYPES:
        return "encoder_decoder"
    mt = getattr(config, "model_type", "")
    if mt in VISION_TYPES:
        return "vision"
    archs = getattr(config, "architectures", None) or []
    if mt in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    return "encoder"


class FrozenBackbone(nn.Module):
    """Base: freezing, eval mode and no-grad; subclasses say how to get hidden states."""

    is_feature_map = False
    kind = "encoder"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.layer_indices: List[int] = []

    def train(self, mode: bool = True):
        # The backbone stays in eval mode whatever the trainer asks: dropout/BN statistics are part of the
        # frozen function the side network learns on.
        super().train(mode)
        self.model.eval()
        return self

    def tap(self, layer_indices: Sequence[int]) -> None:
        self.layer_indices = list(layer_indices)

    @property
    def num_hidden_states(self) -> int:
        raise NotImplementedError

    def all_hidden_sizes(self) -> List[int]:
        raise NotImplementedError

    @property
    def hidden_sizes(self) -> List[int]:
        sizes = self.all_hidden_sizes()
        return [sizes[i] for i in self.layer_indices]

    def forward(self, batch: Dict[str, torch.Tensor]) -> BackboneOutput:
        with torch.no_grad():
            return self._forward(batch)

    def _forward(self, batch) -> BackboneOutput:
        raise NotImplementedError


class HFBackbone(FrozenBackbone):
    """A transformers model: encoders, decoders (last-token pooling), T5's encoder, ViT-like vision towers."""

    def __init__(self, model: nn.Module, kind: str, tokenizer=None, name: str = ""):
        super().__init__(model)
        self.kind = kind
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.hidden_size = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
        self._num_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers")
        self.tap(range(self.num_hidden_states))

    @property
    def num_hidden_states(self) -> int:
        return self._num_layers + 1  # the embedding output plus every block

    def all_hidden_sizes(self) -> List[int]:
        return [self.hidden_size] * self.num_hidden_states

    @property
    def out_dim(self) -> int:
        return self.hidden_size

    def _inputs(self, batch):
        if self.kind == "vision":
            if "pixel_values" not in batch:
                raise ValueError("a vision backbone needs batch['pixel_values']")
            return dict(pixel_values=batch["pixel_values"].to(next(self.model.parameters()).dtype)), None
        if "input_ids" not in batch:
            raise ValueError("a text backbone needs batch['input_ids'] (and attention_mask)")
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(ids)
        kwargs = dict(input_ids=ids, attention_mask=attn)
        if self.kind == "decoder":
            # Positions from the mask make left and right padding give the same states to real tokens.
            kwargs["position_ids"] = (attn.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        return kwargs, attn.bool()

    def _forward(self, batch) -> BackboneOutput:
        kwargs, mask = self._inputs(batch)
        if self._capture is None:
            self._capture = self._choose_capture(kwargs)
        if self._capture:
            states, out = self._forward_hooked(kwargs, self.layer_indices, self._last_from)
        else:
            out = self.model(**kwargs, output_hidden_states=True)
            states = [out.hidden_states[i] for i in self.layer_indices]
        return BackboneOutput(states, mask, out.last_hidden_state)

    # Only the tapped states are kept while the frozen forward runs (transformers' output_hidden_states keeps
    # all L+1 until it returns). The hooks sit on the block list; whether hidden state L is the last block's
    # output or the final (normed) last_hidden_state differs by architecture, so the first batch checks the
    # hooked states against output_hidden_states and keeps the hooks only if every state matches exactly.
    _capture: Optional[bool] = None

    _last_from = "block"
    # A tuple, not the ModuleList itself: assigning a module would register it a second time as a child.
    _block_cache: Optional[tuple] = None

    def _blocks(self) -> Optional[nn.ModuleList]:
        """The block list, found once: walking a large model's modules on every batch would cost real time."""
        if self._block_cache is None:
            found = [m for _, m in self.model.named_modules()
                     if isinstance(m, nn.ModuleList) and len(m) == self._num_layers]
            self._block_cache = (found[0] if found else None,)
        return self._block_cache[0]

    def _forward_hooked(self, kwargs, indices, last_from):
        blocks = self._blocks()
        kept: Dict[int, torch.Tensor] = {}
        handles = []

        def first(x):
            return x[0] if isinstance(x, (tuple, list)) else x

        if 0 in indices:
            def pre(_m, args, kw):
                kept[0] = kw["hidden_states"] if "hidden_states" in kw else args[0]
            handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i in indices:
            if i >= 1 and not (i == self._num_layers and last_from == "final"):
                handles.append(blocks[i - 1].register_forward_hook(
                    lambda _m, _a, out, i=i: kept.__setitem__(i, first(out))))
        try:
            out = self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()
        if self._num_layers in indices and last_from == "final":
            kept[self._num_layers] = out.last_hidden_state
        return [kept[i] for i in indices], out

    def _choose_capture(self, kwargs) -> bool:
        if self._blocks() is None:
            return False
        ref = self.model(**kwargs, output_hidden_states=True).hidden_states
        if len(ref) != self.num_hidden_states:
            raise RuntimeError(f"backbone returned {len(ref)} hidden states, expected {self.num_hidden_states}")
        every = list(range(self.num_hidden_states))
        for last_from in ("block", "final"):
            try:
                states, _ = self._forward_hooked(kwargs, every, last_from)
            except (KeyError, IndexError, TypeError):
                return False
            if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(states, ref)):
                self._last_from = last_from
                return True
        return False


class HookedBackbone(FrozenBackbone):
    """Any nn.Module (e.g. a CNN): the outputs of named submodules are taken with forward hooks.

    `final` is the last hooked output. `example_input` is run once to learn the stage shapes.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], example_input: torch.Tensor,
                 input_key: str = "pixel_values", preprocess: Optional[Callable] = None):
        super().__init__(model)
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise ConfigError(f"backbone has no submodule(s) {missing}; some valid names: "
                              f"{[n for n in modules if n][:20]}")
        self.layer_names = list(layer_names)
        self.input_key = input_key
        self.preprocess = preprocess
        self._captured: Dict[str, torch.Tensor] = {}
        for name in self.layer_names:
            modules[name].register_forward_hook(self._hook(name))
        with torch.no_grad():
            self._run(example_input)
        first = self._captured[self.layer_names[0]]
        self.is_feature_map = first.dim() == 4
        self.kind = "vision"
        self._sizes = [self._captured[n].shape[1] if self.is_feature_map else self._captured[n].shape[-1]
                       for n in self.layer_names]
        self.stage_sizes = [tuple(self._captured[n].shape[-2:]) for n in self.layer_names] if self.is_feature_map else []
        self._captured.clear()
        self.tap(range(len(self.layer_names)))

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _run(self, x):
        x = x.to(next(self.model.parameters()).dtype)
        self.model(self.preprocess(x) if self.preprocess else x)

    @property
    def num_hidden_states(self) -> int:
        return len(self.layer_names)

    def all_hidden_sizes(self) -> List[int]:
        return list(self._sizes)

    @property
    def out_dim(self) -> int:
        return self._sizes[-1]

    def _forward(self, batch) -> BackboneOutput:
        self._captured.clear()
        self._run(batch[self.input_key])
        outs = [self._captured[self.layer_names[i]] for i in self.layer_indices]
        self._captured.clear()
        return BackboneOutput(outs, None, outs[-1])


def _load_hf(cfg: BackboneConfig, path: str):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = os.path.isdir(path)
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        hint = (f"{path!r} is not a readable model directory (it needs config.json)" if local else
                f"could not load {path!r}: no network to a model hub here, and it is not in the local cache")
        raise BackboneLoadError(f"{hint}. Download the model on a machine with network "
                                f"(e.g. `hf download {path} --local-dir DIR`) and pass backbone.path=DIR. "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(hf_config)
    dtype = DTYPES[cfg.dtype]
    if cfg.random_init:
        model = AutoModel.from_config(hf_config, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    else:
        try:
            model = AutoModel.from_pretrained(path, config=hf_config, dtype=dtype,
                                              trust_remote_code=cfg.trust_remote_code)
        except OSError as err:
            raise BackboneLoadError(f"{path!r} has a config but its weights could not be loaded ({err}). Point "
                                    "backbone.path at a directory holding the model's weights, or set "
                                    "backbone.random_init=true for a smoke run.") from None
    if kind == "encoder_decoder":
        model = model.get_encoder()
        model.config = hf_config
    tokenizer = None
    if kind != "vision":
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise BackboneLoadError(f"no tokenizer could be loaded from {path!r} ({err}); the directory needs the "
                                    "tokenizer files saved next to the model") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "right" if cfg.padding_side == "auto" else cfg.padding_side
    return HFBackbone(model, kind, tokenizer, name=path)


def _load_builtin_module(cfg: BackboneConfig, name: str) -> FrozenBackbone:
    try:
        module = BUILTIN_MODULES[name]()
    except AssetError as err:
        raise BackboneLoadError(str(err)) from None
    module = module.to(DTYPES[cfg.dtype])
    stages = EFFICIENTNET_LITE0_STAGES
    bb = HookedBackbone(module, stages, torch.zeros(1, 3, 64, 64))
    bb.name = f"builtin:{name}"
    return bb


def load_backbone(cfg: BackboneConfig) -> FrozenBackbone:
    """The one way to load a backbone: builtin:NAME, a local directory, or a hub id (cache only when offline)."""
    path = cfg.path
    if not path:
        raise ConfigError("backbone.path is empty; give a local model directory or builtin:all-MiniLM-L6-v2")
    if path.startswith("builtin:") and path.split(":", 1)[1] in BUILTIN_MODULES:
        return _load_builtin_module(cfg, path.split(":", 1)[1])
    if path.startswith("builtin:"):
        try:
            path = resolve_builtin(path)
        except AssetError as err:
            raise BackboneLoadError(str(err)) from None
    elif path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise BackboneLoadError(f"backbone.path={path!r} does not exist; pass a directory holding config.json")
    return _load_hf(cfg, os.path.expanduser(path))


def wrap_module(model: nn.Module, layer_names: Sequence[str], example_input: torch.Tensor, **kw) -> HookedBackbone:
    """Use a plain nn.Module as a frozen backbone; stage outputs come from forward hooks on `layer_names`."""
    return HookedBackbone(model, layer_names, example_input, **kw)
