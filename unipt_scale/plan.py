"""`unipt plan`: per-GPU memory of UniPT vs LoRA vs full fine-tuning under DeepSpeed ZeRO, from a config alone.

Why: a 70B run that does not fit costs a queue wait and a cluster start-up to find out. The planner needs no
weights, no torch and no GPU; it reads a backbone's architecture numbers (a built-in preset or a config.json)
and a cluster shape, and prints what each rank holds.

The model (bytes; P = 2 for bf16/fp16, 4 for fp32; W = world size = nodes x GPUs per node):

Parameters, mixed-precision Adam: a trained parameter costs 16 bytes = P (weight) + P (gradient) + (16 - 2P)
(fp32 master copy when P = 2, and Adam's two fp32 moments). A frozen parameter costs only its P-byte weight.
ZeRO divides by W: stage 1 the optimizer state, stage 2 also the gradients, stage 3 also every weight -
frozen backbone weights included, since ZeRO-3 partitions all parameters. ZeRO-3 gathers one module (block,
embedding) at a time for its forward/backward, so the largest module's full P-byte weights are added as a
transient ("zero3_gather"; for full fine-tuning also that module's full gradient before its reduce-scatter).
--offload optimizer moves the optimizer state (and DeepSpeed's fp32 gradient copy) to host memory;
--offload param (stage 3 only) also moves the weights, leaving only the gathered transient on the GPU.

Activations of full fine-tuning, per layer and sample, in bytes: N.h.(34 + 5.a.N/h) for a GPT/BERT block
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", no recomputation,
half precision, 1-byte dropout masks; N tokens, h hidden, a heads). The planner does not use that constant
blindly: it adds up the tensors autograd saves in the Hugging Face implementation of each family, which gives
exactly 34 + 5aN/h for BERT (post-LN, GELU MLP of 4h, dropout everywhere) and e.g. 24h + 8I + 6aN per token
for Llama (RMSNorm upcast to fp32, SwiGLU of width I, fp32 softmax, no dropout). With --attention flash the
N x N score terms are replaced by what a fused kernel keeps (q, k, v, output and an fp32 log-sum-exp per head).
LoRA keeps less than full fine-tuning: a frozen Linear does not keep its input, so only the adapted modules'
inputs (plus the rank-r intermediate) and the inputs of nonlinearities, norms and attention are stored.
--activation-checkpointing keeps each layer's input (P.h per token) plus one layer's full set, recomputed.

Activations of UniPT: the backbone runs under no-grad, so it keeps nothing for backward. What stays is
(1) the tapped hidden states that feed the side network, L.B.N.D.P (L tapped layers of width D), kept alive
by the side network's down-projections (and the final output, P.D more per token, when the last hidden state is
not tapped), and then the larger of two phases that do not overlap: (2) the side network's own saved tensors, or
(3) the frozen forward itself. The backbone keeps only the tapped states while it runs (forward hooks on the tapped
blocks, HFBackbone._forward_hooked), so beside them are the running block's input and output when they are not
tapped (0-2 x P.D per token) and one layer's working set, counted as that layer's full-fine-tuning saved set (an
upper bound). So activations = stored + max(side network, backbone forward).
The side network (d = mapping width, L' = L - 1 interacting layers) keeps per token the output path (3.P.d:
the fused features, the projection's LayerNorm input and the ReLU output) and, in the causal form (and with the
reference kernels), per interacting layer the merged features M_i (P.d, kept by the confidence aggregation; the
per-sequence form's fused attention-aggregation never forms them). With the fused/efficient
kernels (unipt.kernels auto|triton|efficient) that is all besides, per tapped layer, T_i and the pre-norm
rows (2.P.d; P.d when the projection kernel recomputes the rows, --side-recompute) with fp32 LayerNorm
statistics and, per interacting layer, one fp32 row sum z: O(N) per row. The reference kernels keep per
tapped layer the LayerNorm input and T_i (2.P.d) and, per interacting layer, einsum's copy of the keys
(P.d), relu(S) and the L1-normalised weights (2.P.N: the N x N part) and the row sums.

Side-network parameters, per tower (VSE-infinity + residual layout), counted by unipt_scale.side_spec, the rules
the model is built by: per tapped layer Linear(D_i -> d) + LayerNorm(d): D_i.d + 3d; projection Linear(d -> d) +
LayerNorm(d): d^2 + 3d; gate Linear(d -> 1): d + 1; up-projection Linear(d -> D_out): d.D_out + D_out.
d = D_out // reduction_factor unless --mapping-dim.

Quantized base (--quantization int8|nf4, backbone.quantization; bitsandbytes as transformers' BitsAndBytesConfig
loads it): only the Linears are quantized (every block Linear and BERT's pooler; not T5's wo, embeddings, norms,
biases or the LM head, which stay P bytes). int8 (LLM.int8): 1 byte a weight + 4 bytes per output row; nf4: 0.5
byte a weight + per 64-weight block an 8-bit absmax, per 256 blocks an fp32 scale, per layer 1092 bytes of codes
(double quantization, as on CUDA; quantized_linear_bytes). The dequant working set is the largest Linear's weight
in the compute dtype (nf4 every method; int8 only in QLoRA's backward). LoRA on the quantized base is QLoRA
(column qlora): its non-quantized base weights are fp32 (peft's prepare_model_for_kbit_training), and under int8
every Linear keeps its input for backward. LoRA on the unquantized base stays beside it for comparison; full
fine-tuning is refused, and so is ZeRO-3 (the trainer does not partition quantized weights).

Language modelling on a decoder (--task causal_lm; task.kind=causal_lm, unipt_scale.tasks.causal_lm). The LM head is frozen
for every method, as the task model holds it: untied, a V x D matrix of its own (P bytes each) that every rank
holds whole (a buffer, which ZeRO-3 does not partition); tied, the embedding matrix already counted (under ZeRO-3,
which partitions the embeddings, the tied matrix is read whole too, and full fine-tuning of it is refused). UniPT's side
network is the causal one: per token the bidirectional set plus the gate's prefix means ((L' + 1).P.d, saved by the
per-position aggregation), its fp32 log-sum-exp and 3P of mask and prefix counts (causal_side_extra). The loss
(lm_loss_bytes): chunked (unipt_scale.tasks.causal_lm.chunked_lm_loss, UniPT's default) keeps P.D + 1 bytes per predicted
token (the gradient row its forward writes) and holds one chunk's logits, 4 + P bytes per logit of --loss-chunk-tokens
rows x V (4 in fp32); full (LoRA's and full fine-tuning's default, the model's B x N x V logits upcast for the
loss) costs (12 + P) bytes per logit at
log-softmax's backward. --lm-loss chunked|full sets every method.

Generation (--generate: incremental decoding of --batch-size sequences of --seq-len tokens on each GPU;
generation_bytes): the KV cache 2 x layers x kv_heads x head_dim x N x B x P for every method; UniPT's side cache
L' x B x N x d x P projected states + the gate's prefix sums; and the largest transient of the prompt's forward,
UniPT's side network over the prompt and one decoding step, beside the caches. The ladder baseline (a fourth
column) caches every side block's keys and values at its width D // --ladder-reduction.

Not modelled: task heads (tiny and the same for all methods), the CUDA context and NCCL buffers beyond
--reserve-gib, allocator fragmentation, DeepSpeed's bucket buffers (reduce_bucket_size etc.), and
temporaries of the backward pass. T5 models are planned as their encoder only, as the trainer uses them;
decoders are planned as the base model without the LM head for classification/retrieval (hidden states).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from unipt_scale.config import ConfigError
from unipt_scale.side_spec import (ladder_params, mapping_width, resolve_layers, side_block_heads,
                                    token_side_params)

GIB = 1024 ** 3
METHODS = ("unipt", "lora", "full")
SIDE_METHODS = ("unipt", "ladder")  # a side network beside a frozen, no-grad backbone

# Published architectures (Touvron et al. 2023; Raffel et al. 2020; Radford et al. 2021; Devlin et al. 2019),
# written as the fields of their Hugging Face config.json so presets and files take the same path.
PRESETS: Dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
    "llama-2-13b": dict(model_type="llama", num_hidden_layers=40, hidden_size=5120, intermediate_size=13824,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096),
    "llama-2-70b": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096),
    "t5-base": dict(model_type="t5", num_layers=12, num_decoder_layers=12, d_model=768, d_ff=3072, num_heads=12,
                    d_kv=64, vocab_size=32128, feed_forward_proj="relu", n_positions=512),
    "t5-3b": dict(model_type="t5", num_layers=24, num_decoder_layers=24, d_model=1024, d_ff=16384, num_heads=32,
                  d_kv=128, vocab_size=32128, feed_forward_proj="relu", n_positions=512),
    "clip-vit-l-14": dict(model_type="clip", projection_dim=768,
                          text_config=dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                                           num_attention_heads=12, vocab_size=49408, max_position_embeddings=77),
                          vision_config=dict(num_hidden_layers=24, hidden_size=1024, intermediate_size=4096,
                                             num_attention_heads=16, image_size=224, patch_size=14)),
    "clip-vit-b-32": dict(model_type="clip", projection_dim=512,
                          text_config=dict(num_hidden_layers=12, hidden_size=512, intermediate_size=2048,
                                           num_attention_heads=8, vocab_size=49408, max_position_embeddings=77),
                          vision_config=dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                                             num_attention_heads=12, image_size=224, patch_size=32)),
    "clip-vit-b-16": dict(model_type="clip", projection_dim=512,
                          text_config=dict(num_hidden_layers=12, hidden_size=512, intermediate_size=2048,
                                           num_attention_heads=8, vocab_size=49408, max_position_embeddings=77),
                          vision_config=dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                                             num_attention_heads=12, image_size=224, patch_size=16)),
    "bert-base": dict(model_type="bert", num_hidden_layers=12, hidden_size=768, intermediate_size=3072,
                      num_attention_heads=12, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
}

LLAMA_LIKE = ("llama", "mistral", "qwen2")
BERT_LIKE = ("bert", "roberta", "xlm-roberta")
T5_LIKE = ("t5", "mt5")
CLIP_LIKE = ("clip", "clip_text_model", "clip_vision_model")
SUPPORTED_TYPES = LLAMA_LIKE + BERT_LIKE + T5_LIKE + CLIP_LIKE

# I-sized tensors an activation function's autograd keeps (x or y; quick_gelu also sigmoid(1.702x);
# the Python tanh-GELU keeps x, tanh(.), 0.5x and 1 + tanh(.)).
ACT_SAVED = {"gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "relu": 1, "quick_gelu": 2, "gelu_new": 4}


class PlanError(ValueError):
    """Input the planner cannot use; the message names the fix."""


@dataclass(frozen=True)
class Tower:
    """One transformer stack: the unit the side network taps and the activation formulas run over."""
    name: str
    family: str                  # bert | llama | t5 | clip
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 0               # 0: a vision tower (patch embedding instead of a token table)
    max_positions: int = 0       # learned absolute positions; 0 = rotary/relative (no hard limit)
    default_tokens: int = 512
    norm: str = "layernorm"      # layernorm | rms_fp32 (Llama) | rms_t5
    post_norm: bool = False      # BERT: norms after the residual add (no pre-norm on layer 0's input)
    mlp: str = "plain"           # plain (2 matrices) | gated (3 matrices)
    act: str = "gelu"
    bias: bool = True            # biases on every Linear
    qkv_bias: bool = False       # biases on q, k, v only (Qwen2)
    dropout: bool = False        # hidden dropout after attention / MLP outputs and on embeddings
    attn_dropout: bool = False   # dropout on the attention probabilities
    mlp_dropout: bool = False    # dropout between the MLP's activation and its output matrix (T5)
    softmax_fp32: bool = False   # softmax computed in fp32, then cast back (Llama, CLIP)
    type_vocab: int = 0          # BERT token types
    pooler: bool = False         # BERT pooler dense
    rel_buckets: int = 0         # T5 relative position buckets (layer 0)
    final_norm: bool = True      # a norm over all tokens after the last block
    pooled_norm: bool = False    # CLIP vision: norm over the pooled token only
    image_size: int = 0
    patch_size: int = 0
    channels: int = 3
    tied_head: bool = False      # decoders: the LM head is the input embedding matrix (tie_word_embeddings)

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def tokens(self, seq_len: Optional[int], image_size: Optional[int]) -> int:
        if self.vocab == 0:
            size = image_size or self.image_size
            return (size // self.patch_size) ** 2 + 1
        return seq_len or self.default_tokens

    def linears(self) -> Dict[str, tuple]:
        """(in, out) of every Linear in one block, by role."""
        h, i = self.hidden, self.intermediate
        out = {"q": (h, self.inner), "k": (h, self.kv_dim), "v": (h, self.kv_dim), "o": (self.inner, h)}
        if self.mlp == "gated":
            out.update(gate=(h, i), up=(h, i), down=(i, h))
        else:
            out.update(up=(h, i), down=(i, h))
        return out

    # ---- parameters -------------------------------------------------------------------------------------
    def norm_params(self) -> int:
        return 2 * self.hidden if self.norm == "layernorm" else self.hidden

    def layer_params(self) -> int:
        n = sum(a * b for a, b in self.linears().values())
        if self.bias:
            n += sum(b for _, b in self.linears().values())
        elif self.qkv_bias:
            n += self.inner + 2 * self.kv_dim
        return n + 2 * self.norm_params()

    def embedding_params(self) -> int:
        h = self.hidden
        if self.vocab == 0:
            patches = (self.image_size // self.patch_size) ** 2
            return self.channels * self.patch_size ** 2 * h + h + (patches + 1) * h + self.norm_params()
        n = self.vocab * h + self.max_positions * h + self.type_vocab * h
        if self.family == "bert":
            n += self.norm_params()
        return n

    def other_params(self) -> int:
        h = self.hidden
        n = self.rel_buckets * self.heads
        if self.final_norm or self.pooled_norm:
            n += self.norm_params()
        if self.pooler:
            n += h * h + h
        return n

    def params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params() + self.other_params()

    def largest_module_params(self) -> int:
        return max(self.layer_params(), self.embedding_params())

    def quantized_linears(self) -> List[tuple]:
        """(in, out, how many) of the Linears bitsandbytes quantizes when transformers loads this tower: every
        block Linear, and BERT's pooler; not T5's MLP output `wo` (T5's _keep_in_fp32_modules, left in full
        precision), embeddings, norms, a vision tower's patch convolution or an LM head."""
        out = [(a, b, self.layers) for role, (a, b) in self.linears().items()
               if not (self.family == "t5" and role == "down")]
        if self.pooler:
            out.append((self.hidden, self.hidden, 1))
        return out


@dataclass(frozen=True)
class Model:
    name: str
    kind: str                    # encoder | decoder | encoder_decoder | dual | vision
    towers: tuple
    notes: tuple = ()

    def params(self) -> int:
        return sum(t.params() for t in self.towers)


# ---- reading architectures -----------------------------------------------------------------------------------
def _need(d: dict, key: str, where: str):
    if key not in d:
        raise PlanError(f"{where} has no {key!r}; the planner needs it (is this a complete Hugging Face config.json?)")
    return d[key]


def _llama_tower(d: dict, where: str) -> Tower:
    h = _need(d, "hidden_size", where)
    heads = _need(d, "num_attention_heads", where)
    return Tower(name="decoder", family="llama", layers=_need(d, "num_hidden_layers", where), hidden=h,
                 intermediate=_need(d, "intermediate_size", where), heads=heads,
                 kv_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim") or h // heads,
                 vocab=_need(d, "vocab_size", where), default_tokens=d.get("max_position_embeddings", 4096),
                 norm="rms_fp32", mlp="gated", act=d.get("hidden_act", "silu"),
                 bias=bool(d.get("attention_bias", False) and d.get("mlp_bias", False)),
                 qkv_bias=d.get("model_type") == "qwen2" or bool(d.get("attention_bias", False)),
                 attn_dropout=float(d.get("attention_dropout", 0.0)) > 0, softmax_fp32=True,
                 tied_head=bool(d.get("tie_word_embeddings", False)))


def _bert_tower(d: dict, where: str) -> Tower:
    h = _need(d, "hidden_size", where)
    heads = _need(d, "num_attention_heads", where)
    offset = 2 if d.get("model_type") in ("roberta", "xlm-roberta") else 0  # RoBERTa reserves padding_idx + 1
    maxpos = d.get("max_position_embeddings", 512)
    return Tower(name="encoder", family="bert", layers=_need(d, "num_hidden_layers", where), hidden=h,
                 intermediate=d.get("intermediate_size", 4 * h), heads=heads, kv_heads=heads, head_dim=h // heads,
                 vocab=_need(d, "vocab_size", where), max_positions=maxpos, default_tokens=maxpos - offset,
                 norm="layernorm", post_norm=True, act=d.get("hidden_act", "gelu"),
                 dropout=float(d.get("hidden_dropout_prob", 0.1)) > 0,
                 attn_dropout=float(d.get("attention_probs_dropout_prob", 0.1)) > 0,
                 type_vocab=d.get("type_vocab_size", 2), pooler=True, final_norm=False)


def _t5_tower(d: dict, where: str) -> Tower:
    proj = d.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = proj.split("-", 1)[1] if gated else proj
    if gated and act == "gelu":
        act = "gelu_new"  # T5Config maps gated-gelu to the tanh approximation
    drop = float(d.get("dropout_rate", 0.1)) > 0
    return Tower(name="encoder", family="t5", layers=_need(d, "num_layers", where), hidden=_need(d, "d_model", where),
                 intermediate=_need(d, "d_ff", where), heads=_need(d, "num_heads", where),
                 kv_heads=_need(d, "num_heads", where), head_dim=d.get("d_kv", 64), vocab=_need(d, "vocab_size", where),
                 default_tokens=d.get("n_positions", 512), norm="rms_t5", mlp="gated" if gated else "plain", act=act,
                 bias=False, dropout=drop, attn_dropout=drop, mlp_dropout=drop,
                 rel_buckets=d.get("relative_attention_num_buckets", 32))


def _clip_text_tower(d: dict) -> Tower:
    h = d.get("hidden_size", 512)
    heads = d.get("num_attention_heads", 8)
    maxpos = d.get("max_position_embeddings", 77)
    return Tower(name="text", family="clip", layers=d.get("num_hidden_layers", 12), hidden=h,
                 intermediate=d.get("intermediate_size", 2048), heads=heads, kv_heads=heads, head_dim=h // heads,
                 vocab=d.get("vocab_size", 49408), max_positions=maxpos, default_tokens=maxpos,
                 act=d.get("hidden_act", "quick_gelu"), attn_dropout=float(d.get("attention_dropout", 0.0)) > 0,
                 softmax_fp32=True)


def _clip_vision_tower(d: dict) -> Tower:
    h = d.get("hidden_size", 768)
    heads = d.get("num_attention_heads", 12)
    return Tower(name="vision", family="clip", layers=d.get("num_hidden_layers", 12), hidden=h,
                 intermediate=d.get("intermediate_size", 3072), heads=heads, kv_heads=heads, head_dim=h // heads,
                 vocab=0, act=d.get("hidden_act", "quick_gelu"),
                 attn_dropout=float(d.get("attention_dropout", 0.0)) > 0, softmax_fp32=True, final_norm=False,
                 pooled_norm=True, image_size=d.get("image_size", 224), patch_size=d.get("patch_size", 32),
                 channels=d.get("num_channels", 3))


def model_from_config(d: dict, name: str) -> Model:
    """Towers of a Hugging Face config.json (or a preset written in the same fields)."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_TYPES:
        raise PlanError(f"{name}: model_type {mt!r} is not one the planner knows; supported: "
                        f"{', '.join(SUPPORTED_TYPES)} (or use a preset: {', '.join(PRESETS)})")
    if mt in LLAMA_LIKE:
        return Model(name, "decoder", (_llama_tower(d, name),),
                     notes=("planned as the base model: the LM head is not loaded for classification/retrieval",))
    if mt in BERT_LIKE:
        return Model(name, "encoder", (_bert_tower(d, name),))
    if mt in T5_LIKE:
        return Model(name, "encoder_decoder", (_t5_tower(d, name),),
                     notes=("T5: the encoder only, as the trainer uses it (backbone.kind=encoder_decoder)",))
    if mt == "clip_text_model":
        return Model(name, "encoder", (_clip_text_tower(d),))
    if mt == "clip_vision_model":
        return Model(name, "vision", (_clip_vision_tower(d),))
    text, vision = _clip_text_tower(d.get("text_config") or {}), _clip_vision_tower(d.get("vision_config") or {})
    return Model(name, "dual", (text, vision),
                 notes=("CLIP: the text and vision towers as the trainer loads them (backbone + image_backbone); "
                        "the contrastive projections are not loaded",))


def load_model(spec: str) -> Model:
    if spec in PRESETS:
        return model_from_config(PRESETS[spec], spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise PlanError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file or a "
                        "directory holding one; pass a preset name or the path to the model's config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {path} as JSON ({e}); pass the model's Hugging Face config.json") from None
    if not isinstance(d, dict):
        raise PlanError(f"{path} is not a JSON object; pass the model's Hugging Face config.json")
    return model_from_config(d, path)


# ---- side network ----------------------------------------------------------------------------------------------
def resolve_taps(spec, num_hidden_states: int) -> List[int]:
    """Tapped hidden-state indices by the model's own rule (side_spec.resolve_layers); the command line's comma
    list ("0,5,-1") is read as the list of indices it means, and a bad spec names the --layers flag."""
    if isinstance(spec, str) and ("," in spec or spec.strip().lstrip("-").isdigit()):
        items = [x.strip() for x in spec.split(",") if x.strip()]
        try:
            spec = [int(x) for x in items]
        except ValueError:
            bad = next(x for x in items if not x.lstrip("-").isdigit())
            raise PlanError(f"--layers entry {bad!r} is not an integer") from None
    try:
        return resolve_layers(spec, num_hidden_states)
    except ConfigError as e:
        raise PlanError(str(e).replace("unipt.layers=", "--layers ").replace("unipt.layers", "--layers")) from None


def side_width(t: "Tower", o: "Options") -> int:
    try:
        return mapping_width(t.hidden, o.mapping_dim, o.reduction_factor)
    except ConfigError as e:
        raise PlanError(f"{e} (--mapping-dim)") from None


def tower_side_params(t: "Tower", o: "Options") -> int:
    """The side network the trainer builds on this tower (VSE-infinity defaults: last-layer anchor, projected output,
    LayerNorm after each down-projection), counted by side_spec as the model builds it."""
    taps = resolve_taps(o.layers, t.layers + 1)
    blocks = o.side_blocks if o.causal_lm else 0
    return token_side_params([t.hidden] * len(taps), t.hidden, side_width(t, o), side_blocks=blocks,
                             side_mlp_ratio=o.side_mlp_ratio)


def lora_params(t: Tower, rank: int, targets: str) -> int:
    roles = ("q", "v") if targets == "qv" else tuple(t.linears())
    return t.layers * sum(rank * (t.linears()[r][0] + t.linears()[r][1]) for r in roles)


# ---- quantized base weights (bitsandbytes, as transformers' BitsAndBytesConfig loads them) ------------------------
QUANT_SCHEMES = ("none", "int8", "nf4")
NF4_BLOCK = 64               # weights per absmax (transformers fixes bitsandbytes' blocksize at 64)
NF4_SCALE_BLOCK = 256        # absmax values per fp32 scale of the double quantization
NF4_CODE_BYTES = 16 * 4      # the 16-entry NF4 code, fp32, one per layer
DQ_CODE_BYTES = 256 * 4 + 4  # double quantization: the 8-bit dynamic code (fp32) and the absmax offset


def quantized_linear_bytes(n_in: int, n_out: int, scheme: str, layout: str = "cuda") -> int:
    """Resident bytes of one quantized Linear's weight, scales included (its bias stays in the compute dtype).

    int8 (Linear8bitLt, LLM.int8): an int8 weight and one fp32 scale per output row (SCB).
    nf4 (Linear4bit): two 4-bit codes per byte; per block of 64 weights one absmax, which with double quantization
    (layout cuda, bnb_4bit_use_double_quant) is 8-bit with one fp32 scale per 256 blocks, an 8-bit code and an
    offset; the 16-entry code. layout cpu: bitsandbytes 0.50 repacks a CPU layer at its first no-grad forward
    without the double quantization, one bf16 absmax per block (the offset stays)."""
    if scheme == "none":
        raise ValueError("quantized_linear_bytes is for int8 and nf4")
    numel = n_in * n_out
    if scheme == "int8":
        return numel + 4 * n_out
    blocks = -(-numel // NF4_BLOCK)
    packed = -(-numel // 2) + NF4_CODE_BYTES
    if layout == "cpu":
        return packed + 2 * blocks + 4
    return packed + blocks + 4 * -(-blocks // NF4_SCALE_BLOCK) + DQ_CODE_BYTES


def quantized_params(model: "Model") -> int:
    return sum(a * b * k for t in model.towers for a, b, k in t.quantized_linears())


def backbone_weight_bytes(model: "Model", o: "Options", method: str = "unipt") -> int:
    """The frozen backbone's resident weight bytes: P per parameter, or with --quantization the quantized Linears
    (quantized_linear_bytes) and the rest (embeddings, norms, biases, unquantized Linears) in the compute dtype -
    in fp32 for QLoRA, whose preparation (peft's prepare_model_for_kbit_training, as unipt_scale.encoders.backbone_tuning runs it)
    upcasts every non-quantized base weight to fp32."""
    if o.quantization == "none":
        return o.P * model.params()
    rest = (4 if method == "lora" else o.P) * (model.params() - quantized_params(model))
    return rest + sum(k * quantized_linear_bytes(a, b, o.quantization, o.quant_layout)
                      for t in model.towers for a, b, k in t.quantized_linears())


def dequant_bytes(model: "Model", o: "Options", method: str) -> int:
    """The de-quantization working set: the largest quantized Linear's weight materialized in the compute dtype.
    nf4: bitsandbytes dequantizes the whole weight for a matmul over many rows (a training batch, a prompt) and for
    QLoRA's backward, one layer at a time. int8: the forward multiplies int8 codes (no weight is dequantized;
    int8_forward_bytes), but QLoRA's backward dequantizes the weight for the input gradient."""
    if o.quantization == "none" or (o.quantization == "int8" and method != "lora"):
        return 0
    return o.P * max(a * b for t in model.towers for a, b, _ in t.quantized_linears())


def quantized_roles(t: "Tower") -> frozenset:
    return frozenset(r for r in t.linears() if not (t.family == "t5" and r == "down"))


def int8_forward_bytes(t: "Tower") -> int:
    """Bytes per token LLM.int8's forward holds for its largest Linear beside the layer's working set: the input
    cast to fp16 and its int8 codes (2 + 1 per input feature) and the int32 accumulator (4 per output)."""
    return max(3 * a + 4 * b for a, b, _ in t.quantized_linears())


# ---- activations ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedProfile:
    """Bytes of the small tensors autograd keeps; they differ between CUDA and the CPU kernels."""
    mask_bytes: int = 1          # CUDA dropout keeps a bool mask; CPU keeps the mask in the input dtype
    ln_stats_bytes: int = 8      # LayerNorm mean + rstd per token: fp32 on CUDA, input dtype on CPU


CUDA = SavedProfile()


def cpu_profile(P: int) -> SavedProfile:
    return SavedProfile(mask_bytes=P, ln_stats_bytes=2 * P)


def _norm_saved(t: Tower, P: int, prof: SavedProfile, weight_trained: bool) -> int:
    h = t.hidden
    if t.norm == "layernorm":
        return P * h + prof.ln_stats_bytes
    normed = P * h if weight_trained else 0  # weight * normed keeps `normed` only for the weight's gradient
    if t.norm == "rms_fp32":
        return 4 * h + 4 + normed  # the fp32 copy (pow and x * rsqrt) and rsqrt
    return 4 * h + (P * h if P < 4 else 0) + 4 + normed  # T5: the fp32 copy for pow, the input for x * rsqrt


def layer_saved(t: Tower, n: int, trained: frozenset, norms_trained: bool, P: int, attention: str = "eager",
                prof: SavedProfile = CUDA, lora_rank: int = 0, lora_roles: frozenset = frozenset()) -> Dict[str, int]:
    """Bytes per token that one block keeps for backward, by tensor; n = tokens (keys) per sequence."""
    h, i, a = t.hidden, t.intermediate, t.heads
    mb = prof.mask_bytes
    s = {}
    s["norms"] = 2 * _norm_saved(t, P, prof, norms_trained)
    s["attn_input"] = P * h if trained & {"q", "k", "v"} else 0
    if attention == "eager":
        s["q_k_v"] = 3 * P * t.inner  # q and k for q.kT, v for p.v (head-major copies; GQA heads repeated)
        scores = (4 if t.softmax_fp32 else P) * a * n
        if t.attn_dropout:
            scores += (mb + P) * a * n  # dropout mask and dropped probabilities
        elif t.softmax_fp32 and P < 4:
            scores += P * a * n  # the probabilities cast back to half for p.v
        s["scores"] = scores
    else:
        s["q_k_v"] = P * (t.inner + 2 * t.kv_dim) + P * t.inner  # q, k, v and the output
        s["scores"] = 4 * a  # log-sum-exp per head
    s["attn_out_input"] = P * t.inner if "o" in trained else 0
    s["dropout_masks"] = 2 * mb * h if t.dropout else 0
    s["mlp_input"] = P * h if trained & {"gate", "up"} else 0
    act = ACT_SAVED.get(t.act, 2)
    mlp = act * P * i
    down_in = P * i if "down" in trained else 0
    if t.mlp == "gated":
        mlp += (0 if t.act == "relu" else P * i) + P * i  # act(gate) and up, kept by their product
    elif t.act == "relu" and not t.mlp_dropout:
        down_in = 0  # the ReLU output is the very tensor the down-projection keeps
    if t.mlp_dropout:
        mlp += mb * i  # and down_in is then the dropped tensor
    s["mlp_hidden"] = mlp + down_in
    s["lora"] = len(lora_roles) * P * lora_rank
    return s


@dataclass
class Options:
    batch: int = 1
    seq_len: Optional[int] = None
    image_size: Optional[int] = None
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    reserve_gib: float = 2.0
    zero_stage: int = 2
    offload: str = "none"
    dtype: str = "bf16"
    lora_rank: int = 8
    lora_targets: str = "qv"
    mapping_dim: Optional[int] = None
    reduction_factor: int = 2
    layers: object = "all"
    side_kernels: str = "efficient"
    side_recompute: bool = False
    side_blocks: int = 0             # unipt.side_blocks: the deep causal side network (causal_lm only)
    side_heads: int = 0              # unipt.side_heads (0 = d // 64)
    side_mlp_ratio: int = 2          # unipt.side_mlp_ratio
    ladder_reduction: int = 16       # method=ladder (--task causal_lm): ladder.reduction, ladder.rank, ladder.output
    ladder_rank: int = 16
    ladder_output: str = "blend"
    prefill_chunk: int = 0           # --generate: the prompt's positions per forward (0: all at once)
    attention: str = "eager"
    activation_checkpointing: bool = False
    task: str = "classification"     # classification | retrieval (the same plan) | causal_lm
    lm_loss: str = "auto"            # auto (chunked for UniPT, full for LoRA/full) | chunked | full
    loss_chunk_tokens: int = 1024    # task.loss_chunk_tokens: rows of vocabulary-wide logits alive at a time
    generate: bool = False           # plan incremental decoding instead of training
    quantization: str = "none"       # none | int8 | nf4: the frozen base's Linears (bitsandbytes)
    quant_layout: str = "cuda"       # nf4's scales: cuda (double-quantized) | cpu (bitsandbytes' CPU repack)
    cache_samples: int = 0           # data.feature_cache: samples whose tapped states go to disk (0: no cache)
    cache_dtype: str = "float16"     # data.feature_cache_dtype
    profile: SavedProfile = field(default=CUDA)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def P(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def causal_lm(self) -> bool:
        return self.task == "causal_lm" or self.generate


def _tower_extras(t: Tower, n: int, method: str, o: Options) -> Dict[str, int]:
    """Per-sample bytes outside the blocks (embeddings, final norm) and per-forward constants."""
    P, prof = o.P, o.profile
    h = t.hidden
    full = method == "full"
    per_token = 0
    per_sample = 0
    constant = 0
    if t.vocab and full:
        per_token += 8  # token ids kept by the trained embedding lookup
    if t.family == "bert" and full:
        per_token += P * h + prof.ln_stats_bytes + (prof.mask_bytes * h if t.dropout else 0)
    if t.family == "t5":
        if full:
            per_token += prof.mask_bytes * h if t.dropout else 0
            constant += 8 * n * n  # relative-position bucket ids kept by the trained bias lookup
        per_token += prof.mask_bytes * h if t.dropout else 0  # dropout after the final norm
    if t.family == "llama":
        constant += 2 * n * t.head_dim * P  # rotary cos/sin kept by q*cos, k*sin
    if t.vocab == 0:
        if full:
            per_sample += t.channels * (o.image_size or t.image_size) ** 2 * P  # pixels kept by the patch conv
            per_token += _norm_saved(t, P, prof, True)  # pre-norm on the patch embeddings
        # The post-norm reads the pooled token as a view, which keeps the whole last hidden state alive.
        per_token += P * h
        per_sample += prof.ln_stats_bytes
    if t.final_norm:
        per_token += _norm_saved(t, P, prof, full)
    return {"per_token": per_token, "per_sample": per_sample, "constant": constant}


def tower_activations(t: Tower, method: str, o: Options) -> dict:
    """Activation bytes of one tower: per sample (with its parts in `detail`) and per forward (`constant`).

    UniPT's per-sample peak is stored + max(side network, backbone forward): the two phases do not overlap."""
    n = t.tokens(o.seq_len, o.image_size)
    P = o.P
    roles = frozenset(t.linears())
    if method == "ladder":
        return ladder_activations(t, n, o)
    if method == "unipt":
        taps = resolve_taps(o.layers, t.layers + 1)
        L, Li = len(taps), len(taps) - 1
        d = side_width(t, o)
        st = o.profile.ln_stats_bytes
        # the output path: fused, the projection's LayerNorm input, the ReLU output; the merged M_i only where an
        # aggregation keeps them (the causal form's, and the reference kernels' weighted sum): the per-sequence
        # form's fused attention-aggregation never forms them
        merged = Li * P * d if (o.causal_lm or o.side_kernels == "reference") else 0
        side = merged + 3 * P * d + st
        if o.side_kernels == "reference":
            # per tap the LayerNorm input and T_i; per interacting layer einsum's key copy, relu(S), the weights and
            # the row sums
            side += L * (2 * P * d + st) + Li * (P * d + 2 * P * n + 2 * P)
        else:
            # fused/efficient kernels: per tap T_i, fp32 mean/rstd and (unless the projection recomputes them) the
            # pre-norm rows; per interacting layer the fp32 row sum z; one byte of key mask
            side += L * ((1 if o.side_recompute else 2) * P * d + 8) + Li * 4 + 1
        if o.causal_lm:
            side += causal_side_extra(Li, d, n, P, o.side_kernels)
            side += o.side_blocks * side_block_saved(d, n, P, side_block_heads(d, o.side_heads), o.side_mlp_ratio,
                                                     o.profile)
        # The tapped states, and the final output the residual adds to when the last state is not tapped.
        stored = n * (L + (taps[-1] != t.layers)) * P * t.hidden
        # The frozen forward keeps only the tapped states (forward hooks on the tapped blocks, HFBackbone.
        # _forward_hooked); beside them, while block k runs, its input and output when they are not tapped, and one
        # layer's working set. The side network's saved set only exists after it.
        tapped = set(taps)
        stream = max((k not in tapped) + (k + 1 not in tapped) for k in range(t.layers)) if t.layers else 0
        work = sum(layer_saved(t, n, roles, True, P, o.attention, o.profile).values())
        if o.quantization == "int8":
            work += int8_forward_bytes(t)
        forward = n * (stream * P * t.hidden + work)
        # The per-sequence gate, once per sample: the pooled anchor, the layer means, their product (the gate's
        # input) and α. (The causal gate is per position, inside its aggregation's per-token terms.)
        gate = 0 if o.causal_lm else (2 * Li + 1) * P * d + Li * P
        detail = {"stored_hidden_states": stored, "side_network": n * side + gate, "backbone_forward": forward}
        return {"detail": detail, "per_sample": stored + max(n * side + gate, forward), "constant": 0}
    if method == "full":
        layer = layer_saved(t, n, roles, True, P, o.attention, o.profile)
        first_fix = 0
    else:
        lroles = frozenset(("q", "v") if o.lora_targets == "qv" else roles)
        # LLM.int8's autograd function keeps the input of every int8 Linear whose input needs a gradient (ctx.
        # tensors), adapted or not; NF4's keeps only the weight.
        kept = lroles | quantized_roles(t) if o.quantization == "int8" else lroles
        layer = layer_saved(t, n, kept, False, P, o.attention, o.profile, o.lora_rank, lroles)
        # Layer 0 under LoRA: its input carries no gradient, so a pre-norm keeps nothing, and (eager) q.kT keeps
        # q only when k is adapted.
        first_fix = 0 if t.post_norm else _norm_saved(t, P, o.profile, False)
        if o.attention == "eager" and "k" not in lroles:
            first_fix += P * t.inner
    per_layer = sum(layer.values())
    ex = _tower_extras(t, n, method, o)
    if o.activation_checkpointing:
        blocks = t.layers * P * t.hidden + per_layer
    else:
        blocks = t.layers * per_layer - first_fix
    detail = {"layers": n * blocks, "other": n * ex["per_token"] + ex["per_sample"]}
    return {"detail": detail, "per_sample": sum(detail.values()), "constant": ex["constant"],
            "per_layer_per_token": per_layer}


def causal_side_extra(Li: int, d: int, n: int, P: int, kernels: str = "efficient") -> int:
    """Bytes per token the causal side network keeps beyond the bidirectional one (the formula is the same
    otherwise: its cross attention saves q, k and one sum per row as before). The gate reads prefix means, one per
    position instead of one per sequence, and the per-position aggregation saves them: the anchor's and each
    interacting layer's, (Li + 1).P.d, and its fp32 log-sum-exp per position (4); the prefix sums' divisions keep
    the key mask and the two clamped prefix counts in the compute dtype (3P). The reference kernels also keep the
    gate's product a * mu_i (Li.P.d) and alpha (Li.P), no log-sum-exp, and one (B, N, N) causal mask (P.N)."""
    if kernels == "reference":
        return (2 * Li + 1) * P * d + Li * P + 3 * P + P * n
    return (Li + 1) * P * d + 4 + 3 * P


def ladder_activations(t: "Tower", n: int, o: "Options") -> dict:
    """method=ladder (unipt_scale.ladder): every hidden state stored (L = layers + 1 of them), then the side network:
    per hidden state the downsampler's SiLU input and output (2.rank.P), per layer the gate mix's two operands
    (2.P.d) and a side block (side_block_saved), the final LayerNorm's input and statistics and Up's input (2.P.d),
    and with output=blend the side output the gate multiplies (P.D); per forward the gates' sigmoids. The frozen
    forward is UniPT's with every state tapped; the two phases do not overlap."""
    P, d = o.P, t.hidden // o.ladder_reduction
    L = t.layers + 1
    st = o.profile.ln_stats_bytes
    blend = o.ladder_output == "blend"
    side = (2 * L * o.ladder_rank * P + (L - 1) * (2 * P * d + side_block_saved(d, n, P, side_block_heads(d, 0), 2,
                                                                                  o.profile))
            + 2 * P * d + st + (P * t.hidden if blend else 0))
    stored = n * L * P * t.hidden
    work = sum(layer_saved(t, n, frozenset(t.linears()), True, P, o.attention, o.profile).values())
    forward = n * work  # every state is tapped: only one block's working set beside them
    constant = (L - 1) * 2 * P * d + (P * t.hidden if blend else 0)
    detail = {"stored_hidden_states": stored, "side_network": n * side, "backbone_forward": forward}
    return {"detail": detail, "per_sample": stored + max(n * side, forward), "constant": constant}


def side_block_saved(d: int, n: int, P: int, heads: int, mlp_ratio: int, prof: "SavedProfile" = CUDA) -> int:
    """Bytes per token one deep side block (unipt_scale.side_blocks) keeps for backward: the q/k/v projection's
    output (3.P.d, v is a view of it), the rotated q and k and the attention output (3.P.d), the inputs of the
    out-projection, of both LayerNorms and of the first MLP Linear (4.P.d), the MLP's hidden before and after GELU
    (2.r.P.d), the rotary cos and sin of q's and k's calls (4.P.hd), the attention's float mask row (P.n) and fp32
    log-sum-exp per head (4.h), and two LayerNorms' statistics."""
    return (10 + 2 * mlp_ratio) * P * d + 4 * P * (d // heads) + P * n + 4 * heads + 2 * prof.ln_stats_bytes


# ---- the LM head, the LM loss and generation (task causal_lm) ----------------------------------------------------
LM_LOSS_SAVED_PER_ROW = 1    # the 1-byte mask that picks the labelled rows (the loss saves its P.D gradient row)


def lm_loss_kind(method: str, o: Options) -> str:
    if o.lm_loss == "auto":
        return "chunked" if method in SIDE_METHODS else "full"
    return o.lm_loss


def lm_head_params(t: Tower, zero_stage: int = 0) -> int:
    """The frozen LM head: a V x D matrix of its own when untied, the embedding matrix (counted) when tied — except
    under ZeRO-3, which partitions the embeddings: the task model then reads the tied matrix whole as well."""
    return 0 if t.tied_head and zero_stage < 3 else t.vocab * t.hidden


def lm_loss_bytes(t: Tower, kind: str, batch: int, o: Options) -> Dict[str, int]:
    """What the LM loss adds to a training step: bytes per sample and per step (the chunk working set).

    chunked (unipt_scale.tasks.causal_lm.chunked_lm_loss): saved per predicted row (N - 1 per sequence) the gradient
    row the forward wrote (P.D) and the one mask byte that picked it; alive at a time is one chunk of fp32 logits,
    turned into probabilities in place, 4 bytes per logit of min(chunk, B(N - 1)) rows x V, and with a 16-bit head
    P more (the head's product before its upcast, the probabilities' cast for the gradient product).
    full (the model returns B x N x V logits, the loss upcasts them, as transformers' ForCausalLMLoss does):
    (12 + P) bytes per logit at the peak, in log-softmax's backward: the returned P-byte logits, log-softmax's
    saved fp32 output, and its fp32 incoming and outgoing gradients (the fp32 copy of the logits lives only in the
    forward, beside the output it is freed before)."""
    n = t.tokens(o.seq_len, None)
    rows = max(0, n - 1)
    if kind == "chunked":
        work = 4 + (o.P if o.P < 4 else 0)
        return {"per_sample": rows * (o.P * t.hidden + LM_LOSS_SAVED_PER_ROW),
                "constant": work * t.vocab * min(o.loss_chunk_tokens, batch * rows),
                "constant_max": work * t.vocab * o.loss_chunk_tokens}
    return {"per_sample": n * t.vocab * (12 + o.P), "constant": 0, "constant_max": 0}


def layer_forward_bytes(t: Tower, n: int, P: int, attention: str = "eager") -> int:
    """Bytes per token one block holds while it runs without autograd (the prompt's forward in generation),
    beyond its input and the cache: the larger of its attention phase (the normed input, q, k, v, RoPE's
    rotate-half temporaries 2.P.inner; eager attention also the scores, the mask added to them, the fp32 softmax
    and its cast back, (4 + 2P) per head and key) and its MLP phase (the normed input and three I-wide tensors of
    a gated MLP, act(gate), up and their product; two for a plain one)."""
    h, i = t.hidden, t.intermediate
    attn = P * h + P * (t.inner + 2 * t.kv_dim) + 2 * P * t.inner
    if attention == "eager":
        attn += (4 + 2 * P) * t.heads * n
    mlp = P * h + (3 if t.mlp == "gated" else 2) * P * i
    return max(attn, mlp)


def generation_bytes(t: Tower, method: str, o: Options) -> Dict[str, int]:
    """Bytes per sequence of incremental decoding at context N (the prompt and the new tokens).

    kv_cache: 2 x layers x kv_heads x head_dim x N x P (transformers' DynamicCache; GQA stores the kv heads only).
    side_cache (UniPT's SideCache): the interacting layers' projected states Li x N x d x P (the keys of the next
    steps), the key mask (N bytes) and the prefix sums of the gate (Li + 1) x d x P and the count (P).
    transient, the largest of three phases, beside the caches:
    * the prompt's frozen forward: the residual stream (the block's input, held by the loop over blocks, and its
      output: 2.P.D; UniPT keeps every tapped state it has passed instead, L.P.D), RoPE's cos and sin (2.P.head_dim)
      and one block's working set (layer_forward_bytes);
    * UniPT's side network over the prompt: the tapped states (L.P.D; the final output is the last of them when the
      last hidden state is tapped, else P.D more), the output path's two D-wide tensors (Up's output and the
      residual sum, 2.P.D) and, beside the states that become the cache, (5 + 3 Li).P.d: the anchor's T, the merged
      features, the prefix sums and prefix means of the anchor and the interacting layers (locals of the causal
      forward until it returns), the aggregated features and the projection's output;
    * one decoding step: DynamicCache's torch.cat copies one layer's keys or values (kv_heads.head_dim.N.P), plus
      the step's logits (V x (P + 4)); UniPT's side cache is a buffer sized once for the whole generation, written
      in place (its step's own tensors are a few d-wide rows per layer).
    method=ladder (unipt_scale.ladder, d = D // ladder.reduction): its cache is every side block's keys and values
    (layers x 2.N.d.P), the key mask (N) and the fp32 real-token count (4); over the prompt it reads every hidden
    state ((layers + 1).N.D.P, the last one the final output) and its output path holds Up's output, the two blended
    terms and their sum (4.N.D.P; residual: 2.N.D.P) beside a few d-wide tensors.
    The prompt is planned as long as the context (an upper bound). With --prefill-chunk C (`unipt generate
    --prefill-chunk`) the prompt's two phases hold C positions' states, not N's."""
    n = t.tokens(o.seq_len, None)
    P = o.P
    kv = 2 * t.layers * t.kv_dim * n * P
    rope = 2 * P * t.head_dim if t.family == "llama" else 0
    step = t.kv_dim * n * P
    # A chunked prefill runs c positions at a time (each query still scores every earlier key) and, past the first
    # chunk, extends the KV cache by torch.cat as a decoding step does.
    c = min(o.prefill_chunk, n) if o.prefill_chunk else n
    cat = step if c < n else 0
    layer = c * (layer_forward_bytes(t, n, P, o.attention) + rope) + cat
    logits = t.vocab * (P + 4)
    out = {"kv_cache": kv, "side_cache": 0, "prefill_backbone": layer + 2 * c * P * t.hidden, "prefill_side": 0,
           "decode_step": step + logits}
    if method == "unipt":
        taps = resolve_taps(o.layers, t.layers + 1)
        L, Li = len(taps), len(taps) - 1
        d = side_width(t, o)
        tapped = L * c * t.hidden * P
        final = 0 if taps[-1] == t.layers else c * t.hidden * P
        # the deep side blocks' keys and values: 2.d per position each
        out["side_cache"] = Li * n * d * P + n + (Li + 1) * d * P + P + o.side_blocks * 2 * n * d * P
        out["prefill_backbone"] = layer + max(2, L) * c * P * t.hidden
        out["prefill_side"] = tapped + final + 2 * c * t.hidden * P + (5 + 3 * Li) * c * d * P
    elif method == "ladder":
        d = t.hidden // o.ladder_reduction
        states = (t.layers + 1) * c * t.hidden * P
        out["side_cache"] = t.layers * 2 * n * d * P + n + 4
        out["prefill_backbone"] = layer + states
        out["prefill_side"] = states + (4 if o.ladder_output == "blend" else 2) * c * t.hidden * P + 8 * c * d * P
    out["transient"] = max(out["prefill_backbone"], out["prefill_side"], out["decode_step"])
    return out


def _decoder(model: "Model") -> Tower:
    return model.towers[0]


# ---- the plan ---------------------------------------------------------------------------------------------------
def trained_params(model: Model, method: str, o: Options) -> int:
    if method == "full":
        return model.params()
    if method == "lora":
        return sum(lora_params(t, o.lora_rank, o.lora_targets) for t in model.towers)
    if method == "ladder":
        t = _decoder(model)
        return ladder_params(t.layers + 1, t.hidden, o.ladder_reduction, o.ladder_rank, 2, o.ladder_output)
    total = 0
    for t in model.towers:
        total += tower_side_params(t, o)
    return total


def plan_method(model: Model, method: str, o: Options) -> dict:
    P, W, z = o.P, o.world, o.zero_stage
    shard_w = W if z >= 3 else 1
    shard_g = W if z >= 2 else 1
    shard_o = W if z >= 1 else 1
    opt_bytes = 16 - 2 * P  # fp32 master (when P = 2) and two fp32 moments
    off_opt = o.offload in ("optimizer", "param")
    off_par = o.offload == "param"
    n_backbone = model.params()
    n_trained = trained_params(model, method, o)
    on_gpu_w = 0 if off_par else 1
    base_bytes = backbone_weight_bytes(model, o, method)
    parts = {}
    if method in SIDE_METHODS:
        parts["weights"] = on_gpu_w * base_bytes / shard_w
        parts["gradients"] = 0.0
        parts["optimizer"] = 0.0
        side = n_trained * (on_gpu_w * P / shard_w + P / shard_g + (0 if off_opt else opt_bytes / shard_o))
    else:
        extra = n_trained if method == "lora" else 0
        parts["weights"] = on_gpu_w * (base_bytes + P * extra) / shard_w
        parts["gradients"] = P * n_trained / shard_g
        parts["optimizer"] = 0.0 if off_opt else opt_bytes * n_trained / shard_o
        side = 0.0
    acts = {}
    per_sample = 0.0
    constant = 0.0
    for t in model.towers:
        a = tower_activations(t, method, o)
        for k, v in a["detail"].items():
            acts[f"{t.name}.{k}" if len(model.towers) > 1 else k] = v
        per_sample += a["per_sample"]
        constant += a["constant"]
    parts["activations"] = o.batch * per_sample + constant
    parts["side_network"] = side
    largest = max(t.largest_module_params() for t in model.towers)
    gather = 0.0
    if z == 3:
        gather = P * largest * (2 if method == "full" else 1)
    parts["zero3_gather"] = gather
    if o.quantization != "none":
        parts["dequant"] = dequant_bytes(model, o, method)
    grow = per_sample  # bytes per sample of the micro batch
    loss_extra = 0.0  # the chunk working set at a full chunk minus at this batch (for the largest batch)
    if o.causal_lm:
        t = _decoder(model)
        # The frozen head is a buffer of the task model (unipt_scale.tasks.causal_lm.CausalLMModel) for every method: ZeRO-3
        # partitions parameters only, so every rank holds it whole.
        parts["lm_head"] = P * lm_head_params(t, o.zero_stage)
        loss = lm_loss_bytes(t, lm_loss_kind(method, o), o.batch, o)
        parts["lm_loss"] = o.batch * loss["per_sample"] + loss["constant"]
        grow += loss["per_sample"]
        loss_extra = loss["constant_max"] - loss["constant"]
    total = sum(parts.values())
    usable = (o.gpu_mem_gib - o.reserve_gib) * GIB
    static = total - o.batch * grow + loss_extra
    max_batch = int((usable - static) // grow) if grow > 0 and usable > static else 0
    cpu = 0.0
    if off_opt:
        cpu += (opt_bytes + 4) * n_trained / shard_o * o.gpus_per_node  # + DeepSpeed's fp32 gradient copy
    if off_par:
        cpu += P * (n_backbone + (n_trained if method != "full" else 0)) / W * o.gpus_per_node
    return {
        "per_gpu_gib": total / GIB,
        "parts": {k: v / GIB for k, v in parts.items()},
        "activation_detail_gib": {k: o.batch * v / GIB for k, v in acts.items()},
        "activation_per_sample_gib": per_sample / GIB,
        "trained_params": n_trained,
        "fits": total <= usable,
        "max_batch_per_gpu": max_batch,
        "cpu_offload_gib_per_node": cpu / GIB,
        **({"lm_loss": lm_loss_kind(method, o)} if o.causal_lm else {}),
    }


def plan_generate(model: Model, method: str, o: Options) -> dict:
    """Per-GPU memory of incremental decoding: each GPU decodes its own micro batch of --batch-size sequences
    of --seq-len tokens (prompt + new tokens). Weights are placed as for training (whole, or partitioned by ZeRO-3
    with one module gathered at a time; --offload param leaves only the gathered module); LoRA's adapters are
    counted unmerged (merging them removes even that); nothing trains, so no gradients or optimizer state."""
    P, W, z = o.P, o.world, o.zero_stage
    t = _decoder(model)
    shard_w = W if z >= 3 else 1
    on_gpu_w = 0 if o.offload == "param" else 1
    extra = trained_params(model, method, o) if method != "full" else 0
    g = generation_bytes(t, method, o)
    B = o.batch
    parts = {"weights": on_gpu_w * backbone_weight_bytes(model, o) / shard_w, "lm_head": P * lm_head_params(t),
             ("side_network" if method in SIDE_METHODS else "adapters"): on_gpu_w * P * extra / shard_w,
             "kv_cache": B * g["kv_cache"], "side_cache": B * g["side_cache"], "transient": B * g["transient"],
             "zero3_gather": P * t.largest_module_params() if z == 3 else 0.0}
    if method == "full":
        parts.pop("adapters")
    if o.quantization != "none":
        parts["dequant"] = dequant_bytes(model, o, "unipt")  # the prompt's matmuls (nf4); decoding steps fuse it
    total = sum(parts.values())
    per_sample = g["kv_cache"] + g["side_cache"] + g["transient"]
    usable = (o.gpu_mem_gib - o.reserve_gib) * GIB
    static = total - B * per_sample
    return {
        "per_gpu_gib": total / GIB,
        "parts": {k: v / GIB for k, v in parts.items()},
        "per_sample_gib": {k: v / GIB for k, v in g.items()},
        "fits": total <= usable,
        "max_batch_per_gpu": int((usable - static) // per_sample) if usable > static else 0,
    }


FULL_REFUSED = ("full fine-tuning trains every base weight, and a quantized base holds them as frozen 8/4-bit "
                "codes (the trainer refuses method=full with backbone.quantization)")


def columns(p: dict) -> tuple:
    """The plan's columns: the three methods, or with --quantization UniPT and QLoRA on the quantized base, LoRA on
    the unquantized one, and full fine-tuning (refused)."""
    return tuple(p.get("columns", METHODS))


def plan(model: Model, o: Options) -> dict:
    """Every column of the plan. With --quantization: `unipt` and `qlora` (LoRA on the quantized base) on the
    quantized base, `lora` on the base in --dtype for comparison, `full` refused."""
    one = plan_generate if o.generate else plan_method
    head = {"inputs": _inputs(model, o), "model": _model_summary(model, o)}
    if o.cache_samples:
        head["feature_cache"] = feature_cache_plan(head["model"]["towers"], o)
    if o.generate:
        head["mode"] = "generate"
    if o.quantization == "none":
        if o.causal_lm:  # ladder side tuning, the decoder baseline of UniPT's family
            return {**head, "columns": [*METHODS, "ladder"], **{m: one(model, m, o) for m in (*METHODS, "ladder")}}
        return {**head, **{m: one(model, m, o) for m in METHODS}}
    plain = dataclasses.replace(o, quantization="none")
    return {**head, "columns": ["unipt", "qlora", "lora", "full"], "unipt": one(model, "unipt", o),
            "qlora": one(model, "lora", o), "lora": one(model, "lora", plain),
            "full": {"refused": FULL_REFUSED, "fits": False, "max_batch_per_gpu": 0}}


def feature_cache_plan(towers: List[dict], o: Options) -> dict:
    """Disk bytes of the tapped-state cache (unipt_scale.feature_cache) before it is written: per sample, every
    tapped state at every position plus the final output, in the cache's dtype (int8 adds a float32 scale per
    position); padding is not stored, so a run with shorter samples writes less."""
    from unipt_scale.feature_cache import estimate_bytes

    per_tower = {t["name"]: estimate_bytes(o.cache_samples, t["tokens"], [t["hidden"]] * (t["tapped_layers"] + 1),
                                           o.cache_dtype) for t in towers}
    return {"samples": o.cache_samples, "dtype": o.cache_dtype, "bytes": sum(per_tower.values()),
            "per_tower_bytes": per_tower}


def _model_summary(model: Model, o: Options) -> dict:
    out = {"name": model.name, "kind": model.kind, "params": model.params(),
           "largest_module_params": max(t.largest_module_params() for t in model.towers),
           "towers": [{"name": t.name, "family": t.family, "layers": t.layers, "hidden": t.hidden,
                       "intermediate": t.intermediate, "heads": t.heads, "kv_heads": t.kv_heads,
                       "tokens": t.tokens(o.seq_len, o.image_size), "params": t.params(),
                       "mapping_dim": side_width(t, o),
                       "tapped_layers": len(resolve_taps(o.layers, t.layers + 1)),
                       "full_layer_bytes_per_token": tower_activations(t, "full", o)["per_layer_per_token"],
                       "korthikanti_bytes_per_token": 34 * t.hidden + 5 * t.heads * t.tokens(o.seq_len,
                                                                                               o.image_size)}
                      for t in model.towers],
           "notes": list(model.notes)}
    if o.quantization != "none":
        q = o.quantization
        out["quantization"] = {
            "scheme": q, "layout": o.quant_layout, "quantized_params": quantized_params(model),
            "quantized_weight_bytes": sum(k * quantized_linear_bytes(a, b, q, o.quant_layout)
                                          for t in model.towers for a, b, k in t.quantized_linears()),
            "other_params": model.params() - quantized_params(model),
            "weight_bytes": backbone_weight_bytes(model, o), "qlora_weight_bytes": backbone_weight_bytes(model, o, "lora"),
            "unquantized_weight_bytes": o.P * model.params(),
            "dequant_bytes": {"unipt": dequant_bytes(model, o, "unipt"), "qlora": dequant_bytes(model, o, "lora")}}
    if o.causal_lm:
        t = _decoder(model)
        out["vocab"] = t.vocab
        out["lm_head_params"] = lm_head_params(t)
        out["tied_head"] = t.tied_head
        out["notes"] = [f"causal LM: the {'tied' if t.tied_head else 'untied'} LM head is frozen for every method "
                        "(unipt_scale.tasks.causal_lm.CausalLMModel)" + ("" if t.tied_head else
                                                            f", {t.vocab} x {t.hidden} held whole on every rank "
                                                            "(a buffer: ZeRO-3 partitions parameters only)")]
    return out


def _inputs(model: Model, o: Options) -> dict:
    out = {"model": model.name, "gpus_per_node": o.gpus_per_node, "nodes": o.nodes, "world_size": o.world,
           "gpu_mem_gib": o.gpu_mem_gib, "reserve_gib": o.reserve_gib, "batch_size": o.batch,
           "seq_len": o.seq_len, "image_size": o.image_size, "zero_stage": o.zero_stage, "offload": o.offload,
           "dtype": o.dtype, "lora_rank": o.lora_rank, "lora_targets": o.lora_targets,
           "mapping_dim": o.mapping_dim, "reduction_factor": o.reduction_factor, "layers": o.layers,
           "side_kernels": o.side_kernels, "side_recompute": o.side_recompute, "attention": o.attention,
           "activation_checkpointing": o.activation_checkpointing, "quantization": o.quantization}
    if o.causal_lm:
        out.update(task="causal_lm", lm_loss=o.lm_loss, loss_chunk_tokens=o.loss_chunk_tokens, generate=o.generate)
        if o.generate:
            out["prefill_chunk"] = o.prefill_chunk
    return out


# ---- command line -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unipt plan",
        description="Per-GPU memory of UniPT vs LoRA vs full fine-tuning under DeepSpeed ZeRO, from the backbone's "
                    "architecture alone (no weights, no GPU).",
        epilog=f"presets: {', '.join(PRESETS)}. The formulas are in the docstring of unipt_scale/plan.py.")
    p.add_argument("model", help="preset name, a config.json, or a model directory holding one")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    p.add_argument("--reserve-gib", type=float, default=2.0,
                   help="kept back for the CUDA context, NCCL and fragmentation (default 2)")
    p.add_argument("--batch-size", type=int, default=1, help="micro batch per GPU (default 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (text towers); default: the model's position limit")
    p.add_argument("--image-size", type=int, default=None, help="image side for vision towers (default: the config's)")
    p.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage 0-3 (default 2)")
    p.add_argument("--offload", default="none", help="none | optimizer | param (param implies optimizer; stage 3)")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32 (default bf16)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="qv", help="qv (peft's default) | all-linear")
    p.add_argument("--mapping-dim", type=int, default=None, help="side-network width d (default: hidden // factor)")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument("--layers", default="all", help="tapped hidden states: all | every:K | last:K | i,j,k")
    p.add_argument("--side-blocks", type=int, default=0,
                   help="--task causal_lm: the deep side network's causal blocks (unipt.side_blocks)")
    p.add_argument("--side-heads", type=int, default=0, help="their attention heads (unipt.side_heads; 0 = d // 64)")
    p.add_argument("--side-mlp-ratio", type=int, default=2, help="their MLP width / d (unipt.side_mlp_ratio)")
    p.add_argument("--ladder-reduction", type=int, default=16, help="--task causal_lm: method=ladder's side width "
                                                                        "d = hidden // this (ladder.reduction)")
    p.add_argument("--ladder-rank", type=int, default=16, help="its downsamplers' rank (ladder.rank)")
    p.add_argument("--ladder-output", default="blend", choices=["blend", "residual"], help="ladder.output")
    p.add_argument("--side-kernels", default="efficient",
                   help="efficient (fused/streaming cross attention, O(N) per row) | reference (N x N)")
    p.add_argument("--side-recompute", action="store_true",
                   help="the fused projection rebuilds its pre-norm rows in backward (kernels recompute=True)")
    p.add_argument("--attention", default="eager", help="eager (N x N scores kept) | flash (fused kernel)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="full/LoRA: keep only each layer's input and recompute (no effect on UniPT's backbone)")
    p.add_argument("--task", default=None,
                   help="classification (default) | retrieval (both plan the backbone's hidden states) | causal_lm "
                        "(language modelling on a decoder through its frozen LM head)")
    p.add_argument("--lm-loss", default="auto",
                   help="causal_lm: auto (default: chunked for UniPT, as unipt_scale trains it; full B x N x V logits "
                        "for LoRA and full fine-tuning, as they are usually run) | chunked | full (every method)")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024,
                   help="causal_lm: rows of logits per chunk of the chunked loss (task.loss_chunk_tokens, "
                        "default 1024)")
    p.add_argument("--generate", action="store_true",
                   help="plan incremental decoding (implies --task causal_lm): weights, KV cache, UniPT's side cache "
                        "for --batch-size sequences of --seq-len tokens per GPU")
    p.add_argument("--prefill-chunk", type=int, default=0, metavar="C",
                   help="--generate: the prompt goes through the model C positions at a time (unipt generate "
                        "--prefill-chunk; 0 = all at once)")
    p.add_argument("--quantization", default="none",
                   help="none (default) | int8 (LLM.int8) | nf4 (4-bit NormalFloat): the frozen base's Linears as "
                        "bitsandbytes holds them (backbone.quantization); LoRA on it is planned as QLoRA, beside "
                        "LoRA on the unquantized base; full fine-tuning is refused")
    p.add_argument("--cache-samples", type=int, default=0, metavar="N",
                   help="also size the tapped-state cache (data.feature_cache) of N samples on disk")
    p.add_argument("--cache-dtype", default="float16", help="float32 | float16 | int8 (data.feature_cache_dtype)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    return p


def _choice(flag: str, value, options) -> None:
    if value not in options:
        raise PlanError(f"{flag} {value!r} is not valid; use one of {', '.join(map(str, options))}")


def options_from_args(args) -> Options:
    """Every check before any work, so a bad flag fails in milliseconds with the fix in the message."""
    _choice("--zero-stage", args.zero_stage, (0, 1, 2, 3))
    _choice("--offload", args.offload, ("none", "optimizer", "param"))
    _choice("--dtype", args.dtype, ("bf16", "fp16", "fp32"))
    _choice("--lora-targets", args.lora_targets, ("qv", "all-linear"))
    _choice("--side-kernels", args.side_kernels, ("efficient", "reference"))
    _choice("--attention", args.attention, ("eager", "flash"))
    if args.task is not None:
        _choice("--task", args.task, ("classification", "retrieval", "causal_lm"))
    _choice("--lm-loss", args.lm_loss, ("auto", "chunked", "full"))
    _choice("--quantization", args.quantization, QUANT_SCHEMES)
    if args.quantization != "none" and args.zero_stage == 3:
        raise PlanError(f"--quantization {args.quantization} with --zero-stage 3: ZeRO-3 partitions parameters, and "
                        "the trainer does not partition bitsandbytes' quantized weights (backbone.quantization is "
                        "not for ZeRO-3); use --zero-stage 0-2 (each rank holds the quantized base whole)")
    if args.generate and args.task not in (None, "causal_lm"):
        raise PlanError(f"--generate plans decoding through the LM head (task causal_lm); drop --task {args.task}")
    task = "causal_lm" if args.generate else (args.task or "classification")
    if task != "causal_lm" and (args.lm_loss != "auto" or args.loss_chunk_tokens != 1024):
        raise PlanError("--lm-loss and --loss-chunk-tokens are for --task causal_lm; add --task causal_lm")
    if args.offload == "param" and args.zero_stage != 3:
        raise PlanError("--offload param needs --zero-stage 3 (only ZeRO-3 partitions parameters); "
                        "use --zero-stage 3 or --offload optimizer")
    if args.offload == "optimizer" and args.zero_stage == 0:
        raise PlanError("--offload optimizer needs ZeRO (--zero-stage 1, 2 or 3)")
    for flag, value in (("--gpus-per-node", args.gpus_per_node), ("--nodes", args.nodes),
                        ("--batch-size", args.batch_size), ("--lora-rank", args.lora_rank),
                        ("--reduction-factor", args.reduction_factor),
                        ("--loss-chunk-tokens", args.loss_chunk_tokens)):
        if value < 1:
            raise PlanError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--seq-len", args.seq_len), ("--image-size", args.image_size),
                        ("--mapping-dim", args.mapping_dim)):
        if value is not None and value < 1:
            raise PlanError(f"{flag} must be >= 1, got {value}")
    _choice("--cache-dtype", args.cache_dtype, ("float32", "float16", "int8"))
    if args.cache_samples < 0:
        raise PlanError(f"--cache-samples must be >= 0, got {args.cache_samples}")
    if args.ladder_reduction < 1 or args.ladder_rank < 1:
        raise PlanError("--ladder-reduction and --ladder-rank must be >= 1")
    if args.prefill_chunk < 0 or (args.prefill_chunk and not args.generate):
        raise PlanError("--prefill-chunk plans decoding: give it with --generate, as a number >= 0 (0 = the whole "
                        "prompt at once)")
    if args.side_blocks < 0 or args.side_heads < 0 or args.side_mlp_ratio < 1:
        raise PlanError("--side-blocks and --side-heads must be >= 0, --side-mlp-ratio >= 1")
    if args.side_blocks and task != "causal_lm":
        raise PlanError("--side-blocks is the deep causal side network: plan it with --task causal_lm")
    if args.gpu_mem_gib <= 0 or args.reserve_gib < 0 or args.reserve_gib >= args.gpu_mem_gib:
        raise PlanError("--gpu-mem-gib must be > 0 and --reserve-gib in [0, gpu memory)")
    return Options(batch=args.batch_size, seq_len=args.seq_len, image_size=args.image_size,
                   gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_mem_gib=args.gpu_mem_gib,
                   reserve_gib=args.reserve_gib, zero_stage=args.zero_stage, offload=args.offload, dtype=args.dtype,
                   lora_rank=args.lora_rank, lora_targets=args.lora_targets, mapping_dim=args.mapping_dim,
                   reduction_factor=args.reduction_factor, layers=args.layers, side_kernels=args.side_kernels,
                   side_blocks=args.side_blocks, side_heads=args.side_heads, side_mlp_ratio=args.side_mlp_ratio,
                   ladder_reduction=args.ladder_reduction, ladder_rank=args.ladder_rank,
                   ladder_output=args.ladder_output,
                   side_recompute=args.side_recompute, attention=args.attention,
                   activation_checkpointing=args.activation_checkpointing, task=task, lm_loss=args.lm_loss,
                   loss_chunk_tokens=args.loss_chunk_tokens, generate=args.generate, quantization=args.quantization,
                   prefill_chunk=args.prefill_chunk, cache_samples=args.cache_samples,
                   cache_dtype=args.cache_dtype)


def check_model(model: Model, o: Options) -> None:
    if o.causal_lm and model.kind != "decoder":
        flag = "--generate" if o.generate else "--task causal_lm"
        raise PlanError(f"{flag} needs a decoder LLM ({', '.join(LLAMA_LIKE)}: a preset such as llama-2-7b or its "
                        f"config.json); {model.name} is {'an' if model.kind[0] in 'ae' else 'a'} {model.kind} model")
    for t in model.towers:
        if len(resolve_taps(o.layers, t.layers + 1)) < 2:
            raise PlanError(f"--layers {o.layers} taps one hidden state of the {t.name} tower; UniPT's anchor is the "
                            "last tapped layer and needs at least one more to interact with: tap 2 or more")
        if t.vocab and o.seq_len and t.max_positions:
            limit = t.default_tokens
            if o.seq_len > limit:
                raise PlanError(f"--seq-len {o.seq_len} exceeds the {limit} learned positions of {model.name}'s "
                                f"{t.name} tower; use --seq-len <= {limit}")
        if t.vocab == 0 and o.image_size and o.image_size % t.patch_size:
            raise PlanError(f"--image-size {o.image_size} is not a multiple of the patch size {t.patch_size}")


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(p: dict) -> str:
    i, m = p["inputs"], p["model"]
    lines = [f"unipt plan: {m['name']} ({m['kind']}, {_fmt_params(m['params'])} parameters)"]
    for t in m["towers"]:
        lines.append(f"  {t['name']}: {t['layers']} layers, hidden {t['hidden']}, MLP {t['intermediate']}, "
                     f"{t['heads']} heads ({t['kv_heads']} kv), {t['tokens']} tokens; side network "
                     f"d={t['mapping_dim']} over {t['tapped_layers']} hidden states")
    for note in m["notes"]:
        lines.append(f"  note: {note}")
    fc = p.get("feature_cache")
    if fc:
        lines.append(f"tapped-state cache (data.feature_cache): {fc['bytes'] / 2 ** 30:.2f} GiB on disk for "
                     f"{fc['samples']:,} samples in {fc['dtype']}, written once, before the epochs that read it")
    lines.append(f"cluster: {i['nodes']} node(s) x {i['gpus_per_node']} GPUs = {i['world_size']} ranks, "
                 f"{i['gpu_mem_gib']:g} GiB each ({i['gpu_mem_gib'] - i['reserve_gib']:g} usable)")
    lm = i.get("task") == "causal_lm"
    gen = p.get("mode") == "generate"
    lines.append(f"run: {'decoding' if gen else 'micro'} batch {i['batch_size']}/GPU, {i['dtype']}, "
                 f"ZeRO-{i['zero_stage']}, offload {i['offload']}, attention {i['attention']}, side kernels "
                 f"{i['side_kernels']}, LoRA r={i['lora_rank']} ({i['lora_targets']})"
                 f"{', activation checkpointing' if i['activation_checkpointing'] and not gen else ''}"
                 f"{', task causal_lm' if lm else ''}")

    cols = columns(p)
    quant = i.get("quantization", "none") != "none"
    if quant:
        q = m["quantization"]
        lines.append(f"quantized base: {q['scheme']} ({_QUANT_WORDS[q['scheme']]}) on "
                     f"{_fmt_params(q['quantized_params'])} Linear weights: {q['quantized_weight_bytes'] / GIB:.2f} "
                     f"GiB with scales, + {_fmt_params(q['other_params'])} others in {i['dtype']} (QLoRA: fp32) = "
                     f"{q['weight_bytes'] / GIB:.2f} GiB (unquantized {q['unquantized_weight_bytes'] / GIB:.2f})")

    def row(label, fmt, get):
        lines.append(f"{label:<24}" + "".join(
            ("refused" if label == "fits" else "-").rjust(12) if "refused" in p[x]
            else format(get(p[x]), fmt).rjust(12) for x in cols))

    header = f"{'per GPU, GiB':<24}" + "".join(f"{_column_label(x, i):>12}" for x in cols)
    if gen:
        return _format_generate(p, lines, row, header)
    lines.append("")
    lines.append(header)
    rows = [("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
            ("activations", "activations"), ("side network", "side_network"), ("ZeRO-3 gather", "zero3_gather")]
    if quant:
        rows.append(("dequant working set", "dequant"))
    if lm:
        rows += [("LM head (frozen)", "lm_head"), ("LM loss", "lm_loss")]
    for label, key in rows:
        row(label, ".2f", lambda r: r["parts"].get(key, 0.0))
    row("total", ".2f", lambda r: r["per_gpu_gib"])
    row("fits", "s", lambda r: "yes" if r["fits"] else "NO")
    row("largest batch / GPU", "d", lambda r: r["max_batch_per_gpu"])
    row("activations / sample", ".2f", lambda r: r["activation_per_sample_gib"])
    row("trained parameters", "s", lambda r: _fmt_params(r["trained_params"]))
    if i["offload"] != "none":
        row("host RAM / node, GiB", ".1f", lambda r: r["cpu_offload_gib_per_node"])
    for t in m["towers"]:
        lines.append(f"{t['name']}: full fine-tuning keeps {t['full_layer_bytes_per_token']:,} B per token and layer "
                     f"(Korthikanti's GPT-block 34h + 5aN: {t['korthikanti_bytes_per_token']:,} B)")
    lines.append("")
    notes = ["UniPT activations = stored hidden states + max(side network, backbone forward); GiB: "
             + ", ".join(f"{k} {v:.2f}" for k, v in p["unipt"]["activation_detail_gib"].items()),
             "16 B per trained parameter (half weight + half grad + fp32 master + 2 fp32 Adam moments); frozen "
             "weights 2 B each in half precision. ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, "
             "ZeRO-3 also every weight (the frozen backbone too) and gathers one module at a time (the 'ZeRO-3 "
             "gather' row)."]
    if quant:
        notes.append(_quant_note(p, i))
    if lm:
        notes.append(_loss_note(p, i))
    lines += [textwrap.fill(n, 116) for n in notes]
    return "\n".join(lines)


_LOSS_WORDS = {"chunked": "chunked", "full": "full logits"}
_QUANT_WORDS = {"int8": "LLM.int8: int8 + an fp32 scale per output row",
                "nf4": "4-bit NF4, blocks of 64, double-quantized scales"}


def _column_label(key: str, i: dict) -> str:
    if i.get("quantization", "none") == "none":
        return key
    return {"unipt": f"unipt {i['quantization']}", "qlora": "QLoRA", "lora": f"LoRA {i['dtype']}"}.get(key, key)


def _quant_note(p: dict, i: dict) -> str:
    q = i["quantization"]
    how = ("the forward multiplies int8 codes; QLoRA's backward dequantizes the weight for the input gradient, and "
           "LLM.int8 keeps every int8 Linear's input for it" if q == "int8" else
           "bitsandbytes dequantizes a layer's whole weight for every matmul over many rows (and again in QLoRA's "
           "backward), one layer at a time")
    return (f"--quantization {q}: UniPT and QLoRA run on the quantized base; 'LoRA {i['dtype']}' is LoRA on the "
            f"unquantized base; full fine-tuning is refused on a quantized base. dequant working set = the largest "
            f"quantized Linear's weight in {i['dtype']} ({how}). QLoRA holds the base's non-quantized weights in "
            "fp32 (peft's prepare_model_for_kbit_training).")


def _loss_note(p: dict, i: dict) -> str:
    kinds = ", ".join(f"{_column_label(m, i)} {_LOSS_WORDS[p[m]['lm_loss']]}" for m in columns(p) if "lm_loss" in p[m])
    how = ("the default: chunked for UniPT, as unipt_scale trains it, and B x N x V logits for LoRA and full "
           "fine-tuning, as they are usually run" if i["lm_loss"] == "auto" else f"--lm-loss {i['lm_loss']}")
    return (f"LM loss ({how}): {kinds}. chunked = {i['loss_chunk_tokens']} rows x vocab of logits alive at a time, "
            "with the gradient written in the forward (4 + P B per logit, 4 in fp32), plus P x D + 1 B saved per "
            "predicted token; full logits = "
            "(12 + P) B per logit of B x N x vocab at the loss's backward (the returned logits, log-softmax's fp32 "
            "output and its two fp32 gradients). --lm-loss chunked|full sets every method.")


def _format_generate(p: dict, lines: List[str], row, header: str) -> str:
    i = p["inputs"]
    n = p["model"]["towers"][0]["tokens"]
    chunk = i.get("prefill_chunk") or 0
    lines.append(f"incremental decoding: {i['batch_size']} sequence(s) of {n} tokens per GPU (prompt + new tokens)"
                 + (f"; the prompt {chunk} positions at a time" if chunk else ""))
    lines.append("")
    lines.append(header)
    rows = (("weights", "weights"), ("LM head (frozen)", "lm_head"), ("side network / adapters", None),
            ("KV cache", "kv_cache"), ("side cache", "side_cache"), ("transient", "transient"),
            ("ZeRO-3 gather", "zero3_gather"))
    if i.get("quantization", "none") != "none":
        rows += (("dequant working set", "dequant"),)
    for label, key in rows:
        if key is None:
            row(label, ".2f", lambda r: r["parts"].get("side_network", r["parts"].get("adapters", 0.0)))
        else:
            row(label, ".2f", lambda r: r["parts"].get(key, 0.0))
    row("total", ".2f", lambda r: r["per_gpu_gib"])
    row("fits", "s", lambda r: "yes" if r["fits"] else "NO")
    row("largest batch / GPU", "d", lambda r: r["max_batch_per_gpu"])
    row("caches / sequence", ".3f", lambda r: r["per_sample_gib"]["kv_cache"] + r["per_sample_gib"]["side_cache"])
    lines.append("")
    notes = ["KV cache = 2 x layers x kv heads x head dim x N x B x dtype bytes (every method); UniPT's side cache "
             "adds its interacting layers' projected states (L' x B x N x d), the gate's prefix sums and the deep "
             "side blocks' keys and values; the ladder's, every side block's keys and values at its own width. "
             "LoRA and full fine-tuning add no cache (LoRA's adapters are counted unmerged).",
             "transient = the largest of: the prompt's frozen forward (one layer's working set; UniPT also collects "
             "the tapped hidden states, the ladder every one), the side network over the prompt (tapped states, "
             "merged features, prefix sums and means; the ladder's output blend) and one decoding step (one "
             "layer's keys or values copied by torch.cat; the side caches are sized once and written in place). "
             "The prompt is planned as long as the context: an upper bound."]
    lines += [textwrap.fill(x, 116) for x in notes]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        o = options_from_args(args)
        if args.json:
            parent = os.path.dirname(os.path.abspath(args.json))
            if not os.path.isdir(parent):
                raise PlanError(f"--json {args.json}: directory {parent} does not exist; create it or pick "
                                "another path")
        model = load_model(args.model)
        check_model(model, o)
    except PlanError as e:
        print(f"unipt plan: error: {e}", file=sys.stderr)
        return 2
    result = plan(model, o)
    print(format_plan(result))
    if args.json:
        from unipt_scale.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
