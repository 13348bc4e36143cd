"""The other methods beside UniPT: the backbone's own final hidden state as the feature, with nothing of the
backbone trained (linear_probe), peft LoRA adapters inside it (lora) or every weight of it (full).

`BackboneEncoder` has the UniPT encoder's interface (`forward(batch) -> (tokens, mask)`, `embed`, `out_dim`,
`pooling`, `trained_state_keys`), so the task models, trainer, engines and checkpoints treat every method alike.

The backbone's own dropout stays off in every method (the backbone is kept in eval mode, as FrozenBackbone
keeps it): the methods then differ only in what is trained, not in the function being trained; a run gives the
same losses on any number of ranks (dropout draws differ per rank); and BatchNorm in conv backbones keeps its
pretrained statistics (frozen BN, as detection fine-tuning does). Regularisation is the head's task.dropout and,
for LoRA, lora.dropout on the adapter branch.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from unipt_scale.backbone import FrozenBackbone, HFBackbone, HFFeatureMapBackbone, HookedBackbone
from unipt_scale.config import ConfigError, LoRAConfig
from unipt_scale.quantization import is_quantized
from unipt_scale.encoders.pooling import resolve_pooling
from unipt_scale.side_network import pool_tokens

TRAINABLE = ("none", "lora", "all")
# First candidate whose names all occur among the adaptable modules: BERT-likes and ViT, Llama/Qwen/Mistral/CLIP,
# DistilBERT, T5/MPNet, GPT-2 (fused qkv), GPT-NeoX/Falcon, ViT-likes with a fused qkv.
LORA_TARGET_CANDIDATES = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v"),
                          ("c_attn",), ("query_key_value",), ("qkv",))


# ------------------------------------------------------------------------------------------------ LoRA targets

def _hf_conv1d() -> tuple:
    """transformers' Conv1D (GPT-2's fused projection, weights stored transposed), if transformers is there."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    return (Conv1D,)


def _adaptable_types() -> tuple:
    """Module types peft's LoRA adapts."""
    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding) + _hf_conv1d()


def _matches(name: str, target: str) -> bool:
    """peft's rule for a name in target_modules: the full module name or its trailing dotted part."""
    return name == target or name.endswith("." + target)


def resolve_lora_targets(module: nn.Module, targets="auto", key: str = "lora.targets",
                         what: str = "this backbone") -> List[str]:
    """The module names LoRA adapts; every given name must match at least one adaptable module."""
    types = _adaptable_types()
    named = [(n, m) for n, m in module.named_modules() if n]
    adaptable = [n for n, m in named if isinstance(m, types)]
    available = sorted({n.rsplit(".", 1)[-1] for n in adaptable})
    if targets == "auto":
        for cand in LORA_TARGET_CANDIDATES:
            if all(any(_matches(n, c) for n in adaptable) for c in cand):
                return list(cand)
        convs = [(n, m) for n, m in named if isinstance(m, nn.Conv2d) and m.groups == 1]
        plain = [n for n, m in convs if type(m) is nn.Conv2d]
        if plain:
            return plain
        if convs:
            kinds = sorted({type(m).__name__ for _, m in convs})
            raise ConfigError(f"{key}=auto: the conv layers of {what} are {kinds}, which peft's LoRA cannot adapt "
                              "(it builds the adapter convs as the layer's own class); use method=full, unipt or "
                              f"linear_probe with this backbone, or set {key} to plain Linear/Conv2d modules")
        raise ConfigError(f"{key}=auto finds no attention query/value projection or conv layer in {what}; set {key} "
                          f"to some of its adaptable module names: {available[:30]}")
    missing = [t for t in targets if not any(_matches(n, t) for n, _ in named)]
    if missing:
        raise ConfigError(f"{key} {missing} match no module of {what}; its adaptable (Linear/Conv/Embedding) "
                          f"modules are named {available[:30]}")
    wrong = sorted({f"{n} ({type(m).__name__})" for n, m in named for t in targets
                    if _matches(n, t) and not isinstance(m, types)})
    if wrong:
        raise ConfigError(f"{key} {list(targets)} name modules LoRA cannot adapt: {wrong[:5]}; use names of "
                          f"Linear/Conv/Embedding modules, e.g. {available[:30]}")
    return list(targets)


def inject_lora(model: nn.Module, cfg: LoRAConfig, what: str = "this backbone") -> List[str]:
    """Put peft LoRA adapters into `model` in place (its module names stay, a target's weight moves to
    `base_layer`); adapters are kept in fp32 whatever the backbone's dtype, as peft's get_peft_model does, so
    AdamW never updates them in half precision. Returns the resolved target names."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = resolve_lora_targets(model, cfg.targets, what=what)
    conv1d = _hf_conv1d()
    fan_in_fan_out = bool(conv1d) and any(isinstance(m, conv1d) for n, m in model.named_modules()
                                          if any(_matches(n, t) for t in targets))
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", fan_in_fan_out=fan_in_fan_out)
    try:
        inject_adapter_in_model(peft_cfg, model)
    except (AssertionError, TypeError, ValueError, NotImplementedError) as err:
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if any(_matches(n, t) for t in targets)})
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"lora.targets {targets}: peft could not put LoRA into {what}'s {kinds} modules ({first}); "
                          "name other modules in lora.targets or use another method") from None
    for name, p in model.named_parameters():
        if is_lora_key(name) and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return targets


def prepare_quantized_base(model: nn.Module) -> None:
    """QLoRA's preparation of a k-bit base (peft): everything frozen, the non-quantized 16-bit weights (norms,
    embeddings) upcast to fp32 for stable adapter gradients. Gradient checkpointing stays off, as for LoRA on a
    full-precision base, so the two baselines differ only in the base's weights."""
    from peft import prepare_model_for_kbit_training

    from unipt_scale.quantization import fit_cpu_kernels

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    fit_cpu_kernels(model, backward_through=True)


def is_lora_key(name: str) -> bool:
    """A state-dict key or parameter name of a peft LoRA adapter (lora_A, lora_B, and the embedding/DoRA forms)."""
    return any(part.startswith("lora_") for part in name.split("."))


# ------------------------------------------------------------------------------------------------ the encoder

class BackboneEncoder(nn.Module):
    """Backbone → its final hidden state (B, N, D), or a conv backbone's last stage flattened to (B, H·W, C).

    trainable: none (linear_probe: runs under no_grad, nothing of it is kept for backward), lora (peft adapters
    trained, base weights frozen) or all (full fine-tuning). For lora/all the forward runs with autograd through
    the transformers model itself (`backbone.model`), since FrozenBackbone.forward always runs under no_grad.
    """

    def __init__(self, backbone: FrozenBackbone, trainable: str = "none", lora: Optional[LoRAConfig] = None,
                 pooling: str = "auto", what: str = "the backbone"):
        super().__init__()
        if trainable not in TRAINABLE:
            raise ConfigError(f"BackboneEncoder trainable={trainable!r}; choose one of {', '.join(TRAINABLE)}")
        self.backbone = backbone
        self.trainable = trainable
        self.out_dim = backbone.out_dim
        self.pooling = resolve_pooling(pooling, backbone)
        self.lora_targets: List[str] = []
        backbone.tap([backbone.num_hidden_states - 1])
        if trainable == "lora":
            if is_quantized(backbone.model):
                prepare_quantized_base(backbone.model)
            self.lora_targets = inject_lora(backbone.model, lora or LoRAConfig(), what=what)
        elif trainable == "all":
            backbone.model.requires_grad_(True)
        # Kept as a tuple: assigning modules would register them a second time as children.
        self._lora_dropouts = tuple(m for n, m in backbone.model.named_modules() if n.endswith("lora_dropout"))
        self._kept: Optional[torch.Tensor] = None
        if isinstance(backbone, HookedBackbone):
            # A hook of our own on the last stage as it is now: when LoRA replaced that module, the backbone's
            # hook sits on the inner base layer and would miss the adapter's contribution.
            last = dict(backbone.model.named_modules())[backbone.layer_names[-1]]
            last.register_forward_hook(self._keep)
        elif trainable != "none" and not isinstance(backbone, (HFBackbone, HFFeatureMapBackbone)):
            raise ConfigError(f"BackboneEncoder takes an HFBackbone or a wrapped module, got {type(backbone).__name__}")

    def _keep(self, _module, _inputs, output):
        self._kept = output[0] if isinstance(output, (tuple, list)) else output

    def train(self, mode: bool = True):
        super().train(mode)  # FrozenBackbone.train keeps the backbone in eval mode (its dropout off)
        for m in self._lora_dropouts:  # LoRA's own dropout follows the trainer
            m.train(mode)
        return self

    def _final(self, batch):
        bb = self.backbone
        if self.trainable == "none":  # the frozen forward itself (shareable: unipt_scale.shared_forward)
            out = bb(batch)
            return out.final, out.mask
        if isinstance(bb, HFFeatureMapBackbone):
            return bb.model(**bb._inputs(batch)[0]).last_hidden_state, None
        if isinstance(bb, HFBackbone):
            kwargs, mask = bb._inputs(batch)
            final = bb.run_model(**kwargs).last_hidden_state
            return final, bb.sequence_mask(mask, final.shape[1])
        self._kept = None
        bb._forward(batch)
        final, self._kept = self._kept, None
        return final, None

    def forward(self, batch: Dict[str, torch.Tensor]):
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable != "none"):
            final, mask = self._final(batch)
        if final.dim() == 4:  # a conv stage (B, C, H, W) → tokens (B, H·W, C)
            final = final.flatten(2).transpose(1, 2)
        return final, mask

    def embed(self, batch) -> torch.Tensor:
        tokens, mask = self(batch)
        return pool_tokens(tokens, mask, self.pooling)

    def trained_state_keys(self) -> List[str]:
        """none: nothing; lora: the adapters; all: every key of the backbone (weights and buffers)."""
        keys = list(self.state_dict())
        if self.trainable == "all":
            return keys
        if self.trainable == "lora":
            return [k for k in keys if is_lora_key(k)]
        return []


def trainable_for(method: str) -> str:
    """The BackboneEncoder mode of a non-UniPT method."""
    modes = {"linear_probe": "none", "lora": "lora", "full": "all"}
    if method not in modes:
        raise ConfigError(f"method={method!r} has no BackboneEncoder; choose one of {', '.join(modes)}")
    return modes[method]

