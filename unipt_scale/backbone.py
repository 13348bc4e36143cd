"""The frozen backbone: one way to load it, freeze it and read its per-layer hidden states.

The backbone always runs in eval mode under `torch.no_grad()`: its hidden states reach the side network as
plain tensors with no autograd history, so nothing inside it is kept for backward and it never gets gradients.

`inspect_backbone` reads only config.json (or a builtin's static table) and the headers of the weight files, so
that a config that cannot run, or a weight file that cannot be read, fails before any weights load;
`load_backbone` runs the same checks first. Weights are read from safetensors only: a pickled checkpoint
(pytorch_model.bin) can run code when it is loaded, so it is refused, never handed to torch or transformers.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from unipt_scale.assets import BUILTIN_MODULE_SPECS, BUILTIN_MODULES, AssetError, resolve_builtin
from unipt_scale.config import BackboneConfig, ConfigError, UniPTConfig

DECODER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gpt2", "gpt_neox", "gptj", "phi", "phi3",
                 "gemma", "gemma2", "gemma3_text", "falcon", "opt", "bloom", "olmo", "olmo2", "smollm3", "granite"}
# ViT-like towers: every hidden state is (B, tokens, hidden_size). Hierarchical ones (Swin, ConvNeXt) change width
# per stage; wrap them with wrap_module and the feature-map variant instead.
VISION_TYPES = {"vit", "clip_vision_model", "siglip_vision_model", "dinov2", "deit", "beit"}
# One backbone over a question's tokens and an image's patches together (ViLT): its hidden states are the text
# tokens followed by the image tokens, and every layer sees both.
VISION_LANGUAGE_TYPES = {"vilt"}
# Convolutional towers whose hidden_states are (B, C, H, W) stage outputs (the stem's, then each stage's): loaded
# as feature-map backbones for the feature-map UniPT, as the builtin EfficientNet-Lite0 is.
FEATURE_MAP_TYPES = {"resnet", "convnext", "convnextv2", "regnet", "bit"}
FEATURE_MAP_PROBE_SIZE = 224  # the input size stage_sizes are given at (their ratios hold at any multiple of 32)
# Vision towers whose stages change token count and width: token UniPT cannot read them (see _check_not_hierarchical).
HIERARCHICAL_VISION_TYPES = {"swin", "swinv2", "donut-swin", "maskformer-swin", "convnext", "convnextv2", "focalnet",
                             "hiera", "pvt", "pvt_v2", "nat", "dinat", "resnet", "regnet", "bit", "efficientnet",
                             "mobilenet_v1", "mobilenet_v2", "mobilevit", "mobilevitv2", "levit", "poolformer",
                             "van", "cvt", "segformer", "textnet", "timm_wrapper"}
# Encoders whose attention uses only relative positions: left padding shifts nothing, no position_ids needed.
RELATIVE_POSITION_TYPES = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}
# Encoder-decoders whose checkpoints hold the encoder under (model.)encoder.* with its token embedding as
# (model.)shared.*: their bare encoder class loads alone, the decoder is never built.
BART_LIKE_TYPES = {"bart", "mbart", "pegasus", "plbart", "blenderbot", "blenderbot-small", "m2m_100"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REMOTE_CODE_FLAG = "--trust-remote-code"
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
# Weight files that are pickles (or zip archives of one): unpickling can run code. TF/Flax files are not
# pickles, but transformers cannot read them without the PyTorch-format conversion either.
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLED_INDEX_SUFFIX = ".bin.index.json"  # pytorch_model.bin.index.json: the shards are pickles
CONVERT_HINT = ("convert it once, where you trust the file: `AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR)` "
                "writes model.safetensors; then set backbone.path=NEW_DIR")


class BackboneLoadError(RuntimeError):
    """A backbone that cannot be read (missing files, custom code not allowed); the message says the fix."""


@dataclass
class BackboneOutput:
    hidden_states: List[torch.Tensor]  # the tapped layers, (B, N, D_i) or (B, C_i, H_i, W_i)
    mask: Optional[torch.Tensor]  # (B, N) bool, True for real tokens; None when every position is real
    final: torch.Tensor  # the backbone's own output that UniPT's residual adds to


@dataclass
class BackboneSpec:
    """What a backbone looks like, known before its weights load (from config.json or a builtin's table)."""

    kind: str  # encoder | decoder | encoder_decoder | vision
    num_hidden_states: int
    hidden_sizes: List[int]  # width of every hidden state (channels for feature maps)
    out_dim: int  # width of the backbone's own output
    is_feature_map: bool = False
    stage_sizes: List[Tuple[int, int]] = field(default_factory=list)  # feature maps: (H, W) at the probe input
    model_type: str = ""
    path: str = ""  # the resolved model directory or hub id ("" for builtin modules)
    hf_config: Any = field(default=None, repr=False, compare=False)


ENCODER_DECODER_TYPES = {"pegasus", "bigbird_pegasus", "led", "marian"} | RELATIVE_POSITION_TYPES | BART_LIKE_TYPES


def detect_kind(config) -> str:
    # An encoder-only T5 checkpoint (T5EncoderModel) says is_encoder_decoder=False; the model type decides.
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "model_type", "") in ENCODER_DECODER_TYPES:
        return "encoder_decoder"
    mt = getattr(config, "model_type", "")
    if mt in VISION_LANGUAGE_TYPES:
        return "vision_language"
    if mt in VISION_TYPES or _is_hierarchical_vision(config):
        return "vision"
    archs = getattr(config, "architectures", None) or []
    if mt in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    return "encoder"


def _pixel_inputs(model: nn.Module, batch, kind: str) -> dict:
    """The batch's pixels in the model's dtype, for a vision or vision-language backbone."""
    if "pixel_values" not in batch:
        raise ValueError(f"a {kind.replace('_', '-')} backbone needs batch['pixel_values']")
    return dict(pixel_values=batch["pixel_values"].to(next(model.parameters()).dtype))


class FrozenBackbone(nn.Module):
    """Base: freezing, eval mode and no-grad; subclasses say how to get hidden states."""

    is_feature_map = False
    kind = "encoder"
    # Whether `final` is the last tapped state (a wrapped module's hooks) rather than the model's own output.
    final_is_last_tapped = False

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
        _check_not_hierarchical(model.config, name)  # fails here, not at the first forward
        self.hidden_size, self._num_layers = _width_and_depth(model.config, kind, name)
        # Encoders that take position_ids get them from the mask, so left padding shifts no absolute position;
        # RoBERTa-style embeddings count positions from padding_idx + 1.
        self._positions_from_mask = kind in ("encoder", "encoder_decoder") and _takes_position_ids(model)
        self._position_offset = _position_offset(model)
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
        pixels = _pixel_inputs(self.model, batch, self.kind) if self.kind in ("vision", "vision_language") else {}
        if self.kind == "vision":
            return pixels, None
        if "input_ids" not in batch:
            raise ValueError("a text backbone needs batch['input_ids'] (and attention_mask)")
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        if attn is None:
            attn = torch.ones_like(ids)
        kwargs = dict(input_ids=ids, attention_mask=attn)
        if self._positions_from_mask:
            # Real tokens count 0, 1, … (+ offset) from their first one; padding gets the offset's pad position.
            counted = attn.long().cumsum(-1) * attn.long()
            kwargs["position_ids"] = (counted + self._position_offset - 1).clamp(min=0)
        if self.kind == "decoder":
            # Positions from the mask make left and right padding give the same states to real tokens.
            kwargs["position_ids"] = (attn.long().cumsum(-1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        return {**kwargs, **pixels}, attn.bool()

    def sequence_mask(self, mask: Optional[torch.Tensor], tokens: int) -> Optional[torch.Tensor]:
        """The mask of the whole output sequence: a vision-language model's text mask, then its image tokens (all
        real: images are whole, never padded)."""
        if self.kind != "vision_language" or mask is None:
            return mask
        return torch.cat([mask, mask.new_ones(mask.shape[0], tokens - mask.shape[1])], 1)

    def run_model(self, **kwargs):
        """The model's forward. ViLT shuffles its image patches with torch.multinomial on every call; drawn here
        from a fixed seed on a forked RNG, the patch order is one fixed function of the input (the output is the
        same set of tokens either way) and the global RNG streams the trainer owns are left untouched."""
        if self.kind != "vision_language":
            return self.model(**kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.model(**kwargs)

    def _forward(self, batch) -> BackboneOutput:
        kwargs, mask = self._inputs(batch)
        if self._capture is None:
            self._capture = self._choose_capture(kwargs)
        if self._capture:
            states, out = self._forward_hooked(kwargs, self.layer_indices, self._last_from)
        else:
            out = self.run_model(**kwargs, output_hidden_states=True)
            states = [out.hidden_states[i] for i in self.layer_indices]
        return BackboneOutput(states, self.sequence_mask(mask, out.last_hidden_state.shape[1]), out.last_hidden_state)

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None):
        """A decoder's forward over new tokens with its own KV cache, for incremental generation: returns the
        tapped states and the final output of the new positions, and the cache. `attention_mask` covers the past
        and the new tokens (left padding allowed); positions come from it, as in the training forward."""
        if self.kind != "decoder":
            raise ValueError("incremental decoding needs a decoder backbone")
        n = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        name = cache_argument(self.model)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions,
                  "use_cache": True, name: past_key_values}
        if self._capture is None and past_key_values is None:
            self._capture = self._choose_capture({**kwargs, "use_cache": False, name: None})
        if self._capture:
            states, out = self._forward_hooked(kwargs, self.layer_indices, self._last_from)
        else:
            out = self.model(**kwargs, output_hidden_states=True)
            states = [out.hidden_states[i] for i in self.layer_indices]
        mask = attention_mask[:, -n:].bool()
        return BackboneOutput(states, mask, out.last_hidden_state), cache_of(out)

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
            out = self.run_model(**kwargs)
        finally:
            for h in handles:
                h.remove()
        if self._num_layers in indices and last_from == "final":
            kept[self._num_layers] = out.last_hidden_state
        return [kept[i] for i in indices], out

    def _choose_capture(self, kwargs) -> bool:
        if self._blocks() is None:
            return False
        ref = self.run_model(**kwargs, output_hidden_states=True).hidden_states
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


def cache_argument(model: nn.Module) -> str:
    """The name a decoder's forward takes its KV cache under (`cache` in recent transformers, else the older
    `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache a decoder's forward returned, under either name."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else getattr(output, "past_key_values", None)


class StagedBackbone(FrozenBackbone):
    """A backbone whose hidden states are known by their widths (`_sizes`), the last tapped one its `final`."""

    final_is_last_tapped = True
    _sizes: List[int]

    @property
    def num_hidden_states(self) -> int:
        return len(self._sizes)

    def all_hidden_sizes(self) -> List[int]:
        return list(self._sizes)

    @property
    def out_dim(self) -> int:
        return self._sizes[-1]


class HookedBackbone(StagedBackbone):
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

    def _forward(self, batch) -> BackboneOutput:
        self._captured.clear()
        self._run(batch[self.input_key])
        outs = [self._captured[self.layer_names[i]] for i in self.layer_indices]
        self._captured.clear()
        return BackboneOutput(outs, None, outs[-1])


class HFFeatureMapBackbone(StagedBackbone):
    """A transformers convolutional tower (ResNet, ConvNeXt, RegNet, BiT): its hidden_states are the stem's and
    every stage's (B, C, H, W) maps, tapped by the feature-map UniPT. `final` is the last tapped stage, as for a
    wrapped module: the feature-map side network ends there (unipt.image_layers may stop short of the last)."""

    is_feature_map = True
    kind = "vision"

    def __init__(self, model: nn.Module, channels: Sequence[int], stage_sizes: Sequence[Tuple[int, int]],
                 name: str = ""):
        super().__init__(model)
        self.name = name
        self._sizes = list(channels)
        self.stage_sizes = [tuple(s) for s in stage_sizes]
        self.tap(range(len(self._sizes)))

    def _inputs(self, batch):
        return _pixel_inputs(self.model, batch, self.kind), None

    def _forward(self, batch) -> BackboneOutput:
        kwargs, _ = self._inputs(batch)
        states = self.model(**kwargs, output_hidden_states=True).hidden_states
        if len(states) != self.num_hidden_states:
            raise RuntimeError(f"backbone returned {len(states)} hidden states, expected {self.num_hidden_states}")
        tapped = [states[i] for i in self.layer_indices]
        return BackboneOutput(tapped, None, tapped[-1])


# --------------------------------------------------------------------------- reading config.json alone


def _feature_map_stages(hf_config, path: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    """(channels, (H, W)) of every hidden state of a convolutional tower, from a forward on the meta device at
    FEATURE_MAP_PROBE_SIZE: config.json alone, nothing allocated, whatever the model's size."""
    from transformers import AutoModel

    size = FEATURE_MAP_PROBE_SIZE
    channels = getattr(hf_config, "num_channels", 3)
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(hf_config)
            states = model(pixel_values=torch.zeros(1, channels, size, size), output_hidden_states=True).hidden_states
    except Exception as err:  # a config transformers cannot build: say which, in one line
        raise BackboneLoadError(f"{path!r}: could not trace the stages of its {hf_config.model_type} config "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not states or any(h.dim() != 4 for h in states):
        raise BackboneLoadError(f"{path!r}: its {hf_config.model_type} hidden states are not (B, C, H, W) maps; "
                                "wrap it with unipt_scale.backbone.wrap_module and stages that are")
    return [int(h.shape[1]) for h in states], [(int(h.shape[2]), int(h.shape[3])) for h in states]


def _is_hierarchical_vision(config) -> bool:
    """Stages of different width/token count: Swin, ConvNeXt, ResNet, … (their configs carry per-stage lists)."""
    mt = getattr(config, "model_type", "")
    return mt in HIERARCHICAL_VISION_TYPES or isinstance(getattr(config, "depths", None), (list, tuple))


def _width_and_depth(config, kind: str, path: str = "") -> Tuple[int, int]:
    """(hidden width, number of blocks) of the part UniPT reads: the encoder of an encoder-decoder."""
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if kind == "encoder_decoder":
        depth = (getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
                 or getattr(config, "num_hidden_layers", None))
    else:
        depth = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    if not isinstance(width, int) or not isinstance(depth, int):
        raise BackboneLoadError(f"config.json of {path or 'the backbone'} ({getattr(config, 'model_type', '?')}) "
                                "names no hidden_size/d_model and num_hidden_layers; point backbone.path at the "
                                "text or vision tower itself (e.g. a CLIPTextModel / CLIPVisionModel directory)")
    return width, depth


def _takes_position_ids(model_or_class) -> bool:
    try:
        return "position_ids" in inspect.signature(model_or_class.forward).parameters
    except (TypeError, ValueError):
        return False


def _position_offset(model: nn.Module) -> int:
    """RoBERTa-style position embeddings (padding_idx set) count real tokens from padding_idx + 1; others from 0."""
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] == "position_embeddings" and isinstance(m, nn.Embedding):
            return 0 if m.padding_idx is None else int(m.padding_idx) + 1
    return 0


def _native_types() -> set:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return set(CONFIG_MAPPING.keys())


def _custom_code_error(path: str, what: str) -> BackboneLoadError:
    return BackboneLoadError(f"{path!r} needs custom Python code ({what}) that transformers does not ship; it is "
                             f"only run when you pass {REMOTE_CODE_FLAG} on the command line (review the code "
                             "first), or use a model transformers supports natively")


def _read_hf_config(path: str, trust_remote_code: bool):
    """config.json as a transformers config, never importing a model directory's own Python unless allowed."""
    from transformers import AutoConfig, PretrainedConfig

    local = os.path.isdir(path)
    try:
        raw, _ = PretrainedConfig.get_config_dict(path)
        if not trust_remote_code and raw.get("auto_map") and raw.get("model_type") not in _native_types():
            raise _custom_code_error(path, f"config.json has auto_map for model_type {raw.get('model_type')!r}")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        msg = str(err).splitlines()[0] if str(err) else ""
        if "trust_remote_code" in str(err):
            raise _custom_code_error(path, msg) from None
        hint = (f"{path!r} is not a readable model directory (it needs config.json)" if local else
                f"could not load {path!r}: no network to a model hub here, and it is not in the local cache")
        raise BackboneLoadError(f"{hint}. Download the model on a machine with network "
                                f"(e.g. `hf download {path} --local-dir DIR`) and pass backbone.path=DIR. "
                                f"({type(err).__name__}: {msg})") from None


def _model_directory(path: str) -> Optional[str]:
    """The local directory transformers reads `path` from: the directory itself, or a hub id's cached snapshot
    (None when the cache holds no config.json for it: then there is nothing local to check)."""
    if os.path.isdir(path):
        return path
    try:
        from transformers.utils import cached_file

        found = cached_file(path, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # the hub client's own errors: _read_hf_config has already said what is wrong
        return None
    return os.path.dirname(found) if found else None


def _inside(model_dir: str, name: str, where: str) -> str:
    full = os.path.normpath(os.path.join(model_dir, name))
    if os.path.isabs(name) or not full.startswith(os.path.normpath(model_dir) + os.sep):
        raise BackboneLoadError(f"{where} names {name!r}, a file outside {model_dir}; refusing it: download the "
                                "model again, or re-save it with save_pretrained")
    return full


def _index_shards(index: str, model_dir: str) -> List[str]:
    try:
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map")
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BackboneLoadError(f"{index} is not a safetensors index (a JSON object whose weight_map maps every "
                                "tensor to its shard file): download the model again, or re-save it with "
                                "save_pretrained") from None
    shards = [_inside(model_dir, shard, index) for shard in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.endswith(".safetensors"):
            raise BackboneLoadError(f"{index} lists {shard}, which is not a safetensors file: backbones load from "
                                    f"safetensors only; {CONVERT_HINT}")
        if not os.path.isfile(shard):
            raise BackboneLoadError(f"{shard} is missing (listed in {index}): the download is incomplete; download "
                                    "the model again")
    return shards


def weight_files(model_dir: str, hf_config=None) -> List[str]:
    """The safetensors files from_pretrained reads from `model_dir`, chosen as transformers chooses (config.json's
    transformers_weights, else model.safetensors, else the shards of model.safetensors.index.json); [] when there
    is none (a tokenizer-only directory). Pickled weights in their place are refused."""
    explicit = getattr(hf_config, "transformers_weights", None)
    config_json = os.path.join(model_dir, "config.json")
    if explicit:
        name = _inside(model_dir, str(explicit), f"{config_json} (transformers_weights)")
        if not name.endswith((".safetensors", ".safetensors.index.json")):
            what = "a pickle (loading it can run code)" if name.endswith(PICKLED_WEIGHT_SUFFIXES) else \
                "not a safetensors file"
            raise BackboneLoadError(f"{config_json}: transformers_weights names {name}, {what}; backbones load from "
                                    f"safetensors only: remove the key to read {SAFE_WEIGHTS}")
        if not os.path.isfile(name):
            raise BackboneLoadError(f"{name} is missing ({config_json} names it in transformers_weights): download "
                                    f"the model again, or remove the key to read {SAFE_WEIGHTS}")
    elif os.path.isfile(os.path.join(model_dir, SAFE_WEIGHTS)):
        name = os.path.join(model_dir, SAFE_WEIGHTS)
    elif os.path.isfile(os.path.join(model_dir, SAFE_WEIGHTS_INDEX)):
        name = os.path.join(model_dir, SAFE_WEIGHTS_INDEX)
    else:
        pickled = sorted(n for n in os.listdir(model_dir)
                         if n.endswith(PICKLED_WEIGHT_SUFFIXES) or n.endswith(PICKLED_INDEX_SUFFIX))
        if pickled:
            raise BackboneLoadError(f"{os.path.join(model_dir, pickled[0])} is a pickle (loading it can run code) "
                                    f"and {model_dir} holds no {SAFE_WEIGHTS}: backbones load from safetensors only; "
                                    f"{CONVERT_HINT}")
        return []
    return _index_shards(name, model_dir) if name.endswith(".index.json") else [name]


def check_weight_files(model_dir: str, hf_config=None) -> None:
    """Every weight file from_pretrained would read has a safetensors header that parses and fits the file:
    reading the header costs microseconds and nothing of the payload, and a garbage or truncated file then fails
    here in one line instead of deep inside transformers."""
    from safetensors import SafetensorError, safe_open

    for path in weight_files(model_dir, hf_config):
        try:
            with safe_open(path, framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BackboneLoadError(f"{path} is not a readable safetensors file ({detail}); download the model "
                                    "again, or re-save it with save_pretrained, and point backbone.path at it"
                                    ) from None


def _resolve_path(cfg: BackboneConfig) -> Tuple[str, Optional[str]]:
    """(model directory or hub id, builtin module name or None); missing paths fail here with the fix."""
    path = cfg.path
    if not path:
        raise ConfigError("backbone.path is empty; give a local model directory or builtin:all-MiniLM-L6-v2")
    if path.startswith("builtin:") and path.split(":", 1)[1] in BUILTIN_MODULES:
        return "", path.split(":", 1)[1]
    if path.startswith("builtin:"):
        try:
            return resolve_builtin(path), None
        except AssetError as err:
            raise BackboneLoadError(str(err)) from None
    if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise BackboneLoadError(f"backbone.path={path!r} does not exist; pass a directory holding config.json")
    return os.path.expanduser(path), None


def _check_not_hierarchical(config, path: str) -> None:
    if _is_hierarchical_vision(config):
        raise ConfigError(f"backbone.path={path!r} is a hierarchical vision tower ({config.model_type}: its stages "
                          "change token count and width), which token UniPT cannot read and which is not one of "
                          f"the convolutional towers loaded as feature maps ({', '.join(sorted(FEATURE_MAP_TYPES))});"
                          " load it yourself and pass it through unipt_scale.backbone.wrap_module(model, "
                          "stage_names, example_input) with stages whose outputs are (B, C, H, W) feature maps, "
                          "for the feature-map UniPT")


def _check_padding_side(padding_side: str, kind: str, model_type: str, model_or_class, path: str) -> None:
    """Left padding moves every real token of an absolute-position encoder unless positions come from the mask."""
    if padding_side != "left" or kind not in ("encoder", "encoder_decoder") or model_or_class is None:
        return
    if model_type in RELATIVE_POSITION_TYPES or _takes_position_ids(model_or_class):
        return
    raise ConfigError(f"backbone.padding_side=left: the {model_type} encoder at {path!r} takes no position_ids, so "
                      "left padding would shift its absolute positions; use backbone.padding_side=right (or auto)")


def _encoder_class(hf_config):
    """(class, key_mapping) that loads only an encoder-decoder's encoder, or (None, None) where none is known."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        full = MODEL_MAPPING[type(hf_config)]
    except KeyError:
        return None, None
    module = importlib.import_module(full.__module__)
    stem = full.__name__[:-len("Model")] if full.__name__.endswith("Model") else full.__name__
    encoder_model = getattr(module, f"{stem}EncoderModel", None)  # T5 family: same key layout as the full model
    if encoder_model is not None:
        return encoder_model, None
    if hf_config.model_type in BART_LIKE_TYPES and getattr(module, f"{stem}Encoder", None) is not None:
        # Full checkpoints say model.encoder.* / model.shared.* (BartModel: encoder.* / shared.*).
        return getattr(module, f"{stem}Encoder"), {r"^(model\.)?encoder\.": "", r"^(model\.)?shared\.": "embed_tokens."}
    return None, None


def _model_class(hf_config, kind: str):
    """The class load_backbone will build, without building it (None for custom code it cannot name)."""
    if kind == "encoder_decoder":
        cls, _ = _encoder_class(hf_config)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        return MODEL_MAPPING[type(hf_config)]
    except KeyError:
        return None


def _check_weights_unless_random(cfg: BackboneConfig, path: str, hf_config) -> None:
    """The weight files' headers, where the weights will be read (not for backbone.random_init)."""
    model_dir = None if cfg.random_init else _model_directory(path)
    if model_dir is not None:
        check_weight_files(model_dir, hf_config)


def inspect_backbone(cfg: BackboneConfig, trust_remote_code: bool = False) -> BackboneSpec:
    """The backbone's shape from config.json alone (or a builtin's table), and its weight files' headers (unless
    backbone.random_init): fails fast, loads no weights."""
    path, builtin = _resolve_path(cfg)
    if builtin is not None:
        table = BUILTIN_MODULE_SPECS[builtin]
        channels = list(table["channels"])
        return BackboneSpec(kind="vision", num_hidden_states=len(channels), hidden_sizes=channels,
                            out_dim=channels[-1], is_feature_map=True,
                            stage_sizes=[tuple(s) for s in table["stage_sizes"]], model_type=builtin)
    hf_config = _read_hf_config(path, trust_remote_code)
    model_type = getattr(hf_config, "model_type", "")
    if model_type in FEATURE_MAP_TYPES:
        channels, sizes = _feature_map_stages(hf_config, path)
        _check_weights_unless_random(cfg, path, hf_config)
        return BackboneSpec(kind="vision", num_hidden_states=len(channels), hidden_sizes=channels,
                            out_dim=channels[-1], is_feature_map=True, stage_sizes=sizes, model_type=model_type,
                            path=path, hf_config=hf_config)
    _check_not_hierarchical(hf_config, path)
    kind = cfg.kind if cfg.kind != "auto" else detect_kind(hf_config)
    if (kind == "vision_language") != (model_type in VISION_LANGUAGE_TYPES):
        raise ConfigError(f"kind={kind} for {path!r}, a {model_type} model: " + (
            "vision_language is for a backbone that reads a question and an image together "
            f"({', '.join(sorted(VISION_LANGUAGE_TYPES))}); use kind=auto" if kind == "vision_language" else
            "it reads a question and an image together; use kind=vision_language (or auto)"))
    width, depth = _width_and_depth(hf_config, kind, path)
    _check_padding_side(cfg.padding_side, kind, model_type, _model_class(hf_config, kind), path)
    _check_weights_unless_random(cfg, path, hf_config)
    return BackboneSpec(kind=kind, num_hidden_states=depth + 1, hidden_sizes=[width] * (depth + 1), out_dim=width,
                        model_type=model_type, path=path, hf_config=hf_config)


def validate_side_network(spec: BackboneSpec, unipt_cfg: UniPTConfig) -> List[int]:
    """Check a UniPT config against a backbone before anything heavy is built; returns the tapped indices."""
    from unipt_scale.side_network import UniPTFeatureMapSideNetwork, UniPTSideNetwork, resolve_layers

    n = spec.num_hidden_states
    layers = resolve_layers(unipt_cfg.layers, n)
    sizes = [spec.hidden_sizes[i] for i in layers]
    width = sizes[-1] if spec.is_feature_map else spec.out_dim  # what the side network's d is taken from
    what = "last tapped stage's channels" if spec.is_feature_map else "backbone's output width"
    if unipt_cfg.mapping_dim is not None and not 1 <= unipt_cfg.mapping_dim <= width:
        raise ConfigError(f"unipt.mapping_dim={unipt_cfg.mapping_dim} is out of range for this backbone: use "
                          f"1..{width} (the {what}), or null for {width} // unipt.reduction_factor")
    if unipt_cfg.mapping_dim is None and not 1 <= unipt_cfg.reduction_factor <= width:
        raise ConfigError(f"unipt.reduction_factor={unipt_cfg.reduction_factor} leaves no side-network width: use "
                          f"1..{width} (the {what}), or set unipt.mapping_dim")
    if spec.is_feature_map:
        if len(layers) < 2:
            raise ConfigError(f"unipt.layers={unipt_cfg.layers!r} taps {len(layers)} stage; the feature-map UniPT "
                              f"needs at least 2 of the stages 0..{n - 1}")
        if len(spec.stage_sizes) == n:
            hl, wl = spec.stage_sizes[layers[-1]]
            for i in layers[:-1]:
                h, w = spec.stage_sizes[i]
                if h % hl or w % wl or h // hl != w // wl:
                    raise ConfigError(f"unipt.layers={unipt_cfg.layers!r}: stage {i} ({h}x{w}) is not an integer "
                                      f"multiple of the last tapped stage {layers[-1]} ({hl}x{wl}); tap stages among "
                                      f"0..{n - 1} whose resolutions divide evenly")
    # The side network's own checks (anchor needs 2 layers, options the CNN form lacks, …), on the meta device:
    # nothing is allocated, whatever the widths.
    with torch.device("meta"):
        if spec.is_feature_map:
            known = len(spec.stage_sizes) == n
            UniPTFeatureMapSideNetwork(unipt_cfg, sizes, [spec.stage_sizes[i] if known else (1, 1) for i in layers])
        else:
            # side_blocks implies the causal form (the config refuses it otherwise).
            UniPTSideNetwork(unipt_cfg, sizes, spec.out_dim,
                             causal=unipt_cfg.causal == "true" or bool(unipt_cfg.side_blocks))
    return layers


# --------------------------------------------------------------------------- loading

def _from_pretrained(cls, path: str, hf_config, dtype, trust_remote_code: bool, key_mapping=None,
                     strict: bool = False, quantization: str = "none"):
    """from_pretrained with one-line errors; `strict`: every weight must come from the checkpoint (used where
    keys are remapped to load an encoder alone, so a layout it does not fit fails instead of staying random).
    `quantization`: the linear layers are quantized by bitsandbytes as they load (see unipt_scale.quantization)."""
    from safetensors import SafetensorError

    from unipt_scale.quantization import bnb_config, load_device_map

    # use_safetensors: transformers never falls back to a pickle, whatever else the directory holds.
    kwargs = dict(config=hf_config, dtype=dtype, output_loading_info=True, use_safetensors=True)
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if key_mapping:
        kwargs["key_mapping"] = key_mapping
    if quantization != "none":
        kwargs.update(quantization_config=bnb_config(quantization, dtype), device_map=load_device_map())
    try:
        model, info = cls.from_pretrained(path, **kwargs)
    except SafetensorError as err:  # a file that changed after inspect_backbone read its header
        raise BackboneLoadError(f"{path!r}: a weight file is not readable safetensors ({str(err).splitlines()[0]}); "
                                "download the model again, or re-save it with save_pretrained") from None
    except OSError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BackboneLoadError(f"{path!r} has a config but its weights could not be loaded ({first}). Point "
                                "backbone.path at a directory holding the model's weights, or set "
                                "backbone.random_init=true for a smoke run.") from None
    except (ValueError, NotImplementedError, RuntimeError) as err:
        if "trust_remote_code" in str(err):
            raise _custom_code_error(path, str(err).splitlines()[0]) from None
        if quantization != "none":
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BackboneLoadError(f"backbone.quantization={quantization}: bitsandbytes could not quantize "
                                    f"{cls.__name__} from {path!r} ({first}); use backbone.quantization=none, or "
                                    "another scheme") from None
        raise
    if quantization != "none":
        from unipt_scale.quantization import fit_cpu_kernels

        fit_cpu_kernels(model)
    missing = sorted(info.get("missing_keys", ())) if strict else []
    if missing:
        raise BackboneLoadError(f"{path!r}: the checkpoint lacks {len(missing)} weight(s) of {cls.__name__} (e.g. "
                                f"{missing[:3]}), which would stay random; point backbone.path at the full "
                                "checkpoint of this model")
    return model


def _load_hf(cfg: BackboneConfig, spec: BackboneSpec, trust_remote_code: bool) -> FrozenBackbone:
    from transformers import AutoModel

    from unipt_scale.preprocessors import load_tokenizer

    path, hf_config, kind = spec.path, spec.hf_config, spec.kind
    dtype = DTYPES[cfg.dtype]
    remote = dict(trust_remote_code=True) if trust_remote_code else {}
    if spec.is_feature_map:
        model = AutoModel.from_config(hf_config, dtype=dtype) if cfg.random_init else \
            _from_pretrained(AutoModel, path, hf_config, dtype, False, quantization=cfg.quantization)
        return HFFeatureMapBackbone(model, spec.hidden_sizes, spec.stage_sizes, name=path)
    encoder_cls, key_mapping = _encoder_class(hf_config) if kind == "encoder_decoder" else (None, None)
    if encoder_cls is not None:
        # Only the encoder is built and read; it keeps its own config (attention implementation included).
        if cfg.random_init:
            model = encoder_cls._from_config(hf_config, dtype=dtype)
        else:
            model = _from_pretrained(encoder_cls, path, hf_config, dtype, False, key_mapping, strict=True,
                                     quantization=cfg.quantization)
    else:
        if cfg.random_init:
            model = AutoModel.from_config(hf_config, dtype=dtype, **remote)
        else:
            model = _from_pretrained(AutoModel, path, hf_config, dtype, trust_remote_code,
                                     quantization=cfg.quantization)
        if kind == "encoder_decoder":
            model = model.get_encoder()  # its own config: replacing it with the full model's drops the mask
    _check_padding_side(cfg.padding_side, kind, spec.model_type, model, path)
    tokenizer = load_tokenizer(cfg, trust_remote_code) if kind != "vision" else None
    return HFBackbone(model, kind, tokenizer, name=path)


def _load_builtin_module(cfg: BackboneConfig, name: str) -> FrozenBackbone:
    try:
        module = BUILTIN_MODULES[name]()
    except AssetError as err:
        raise BackboneLoadError(str(err)) from None
    module = module.to(DTYPES[cfg.dtype])
    table = BUILTIN_MODULE_SPECS[name]
    bb = HookedBackbone(module, table["stages"], torch.zeros(1, 3, table["probe_size"], table["probe_size"]))
    bb.name = f"builtin:{name}"
    return bb


def load_backbone(cfg: BackboneConfig, trust_remote_code: bool = False,
                  unipt_cfg: Optional[UniPTConfig] = None) -> FrozenBackbone:
    """The one way to load a backbone: builtin:NAME, a local directory, or a hub id (cache only when offline).

    `trust_remote_code` comes from the command line only (a config file never enables custom code). With
    `unipt_cfg`, the side network's config is checked against config.json before any weights load.
    """
    from unipt_scale.quantization import QuantizationError, check_supported

    spec = inspect_backbone(cfg, trust_remote_code)
    if unipt_cfg is not None:
        validate_side_network(spec, unipt_cfg)
    try:
        check_supported(cfg.quantization, cfg.path, cfg.path.split(":", 1)[1] if spec.path == "" else None,
                        cfg.random_init)
    except QuantizationError as err:
        raise BackboneLoadError(str(err)) from None
    if spec.path == "":
        return _load_builtin_module(cfg, cfg.path.split(":", 1)[1])
    return _load_hf(cfg, spec, trust_remote_code)


def wrap_module(model: nn.Module, layer_names: Sequence[str], example_input: torch.Tensor, **kw) -> HookedBackbone:
    """Use a plain nn.Module as a frozen backbone; stage outputs come from forward hooks on `layer_names`."""
    return HookedBackbone(model, layer_names, example_input, **kw)
