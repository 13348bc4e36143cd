"""One frozen forward for several side networks.

Nothing in a frozen, no-grad backbone depends on what is trained, so every model that reads it through
`FrozenBackbone.forward` (UniPT, the ladder, the linear probe) can share one forward per batch. A `SharedBackbone`
owns the loaded backbone and hands out `BackboneView`s, one per model: each view taps its own layers and behaves
as the backbone itself (same attributes, same state-dict keys), while inside `SharedBackbone.batch(...)` the
backbone runs once over the union of the views' layers and every view reads its own slice of that one output.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from unipt_scale.backbone import BackboneOutput, FrozenBackbone

if TYPE_CHECKING:
    from unipt_scale.feature_cache import TappedStateCache

# What must agree for models to read one loaded backbone: the backbone as loaded, and how its inputs are padded.
SAME_BACKBONE_KEYS = ("path", "kind", "dtype", "random_init", "quantization", "padding_side")


def different_backbone(a, b) -> Optional[str]:
    """The config field (backbone, image_backbone) on which two run configs load different backbones, or None."""
    for field in ("backbone", "image_backbone"):
        x, y = getattr(a, field), getattr(b, field)
        if (x is None) != (y is None) or (x is not None and any(getattr(x, k) != getattr(y, k)
                                                                 for k in SAME_BACKBONE_KEYS)):
            return field
    return None


def backbone_inputs(backbone: FrozenBackbone) -> Tuple[str, ...]:
    """The batch fields a backbone reads: a vision model its pixels (or a wrapped module its input key), a text
    model its token ids and mask. A retrieval batch carries both; each tower is keyed by its own."""
    if getattr(backbone, "input_key", None):
        return (backbone.input_key,)
    if backbone.kind == "vision":
        return ("pixel_values",)
    if backbone.kind == "vision_language":
        return ("input_ids", "attention_mask", "pixel_values")
    return ("input_ids", "attention_mask")


def _input_key(batch: Dict, names: Sequence[str]) -> Tuple:
    """The inputs a backbone reads, by the memory they occupy and their in-place version: the same rows of the same
    batch give the same key for every view (a slice taken again included), a different batch or an edited one
    another. The memo holds the inputs themselves, so their memory cannot be reused for other data meanwhile."""
    key = []
    for name in names:
        t = batch.get(name)
        key.append(None if not torch.is_tensor(t) else
                   (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version))
    return tuple(key)


class SharedBackbone:
    """A loaded frozen backbone whose forward several views share (see the module docstring)."""

    def __init__(self, backbone: FrozenBackbone, cache: Optional[Callable[[List[int]], "TappedStateCache"]] = None):
        """`cache(layers)`: opens the tapped-state cache for the tapped layers (unipt_scale.feature_cache); blocks
        then read each sample's states from it and run the backbone only for batches with samples it lacks."""
        self.backbone = backbone
        self.views: List["BackboneView"] = []
        self._open = False
        self._memo: Dict[Tuple, Tuple[BackboneOutput, List[int], list]] = {}
        self.forwards = 0  # frozen forwards run (the sharing is measurable)
        self._cache_factory = cache
        self.cache: Optional["TappedStateCache"] = None
        self.inputs = backbone_inputs(backbone)

    def view(self) -> "BackboneView":
        v = BackboneView(self)
        self.views.append(v)
        return v

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Inside, the first view to read a batch (or a slice of its rows) runs the frozen forward and the others
        reuse it; what was computed is kept until the block ends."""
        self._open, self._memo = True, {}
        try:
            yield
        finally:
            self._open, self._memo = False, {}

    def _union(self) -> List[int]:
        return sorted({i for v in self.views for i in v.layer_indices})

    def split(self, batch: Dict, groups: List[torch.Tensor]) -> List[Dict]:
        """Inside a block: one frozen forward over `batch`, and for each group of row indices a sub-batch whose
        frozen forward (for any view) is those rows of it: rows of one batch served by different models."""
        if not self._open:
            raise RuntimeError("SharedBackbone.split runs inside a SharedBackbone.batch() block")
        layers = self._union()
        out = self.read(layers, batch)
        subs = []
        for rows in groups:
            sub = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == len(out.final) else v)
                   for k, v in batch.items()}
            sliced = BackboneOutput([h[rows] for h in out.hidden_states],
                                    None if out.mask is None else out.mask[rows], out.final[rows])
            self._memo[_input_key(sub, self.inputs)] = (sliced, layers, [sub.get(k) for k in self.inputs])
            subs.append(sub)
        return subs

    def read(self, layer_indices: List[int], batch: Dict) -> BackboneOutput:
        """The states of `layer_indices` for `batch`: inside a block from the block's one forward (over the
        union of the views' layers), outside it from a forward of these layers alone."""
        key = _input_key(batch, self.inputs) if self._open else None
        if key is not None and key in self._memo:
            out, layers, _inputs = self._memo[key]
        else:
            layers = self._union() if self._open else list(layer_indices)
            if self._open and self._cache_factory is not None:
                out = self._through_cache(batch, layers)
            else:
                self.backbone.tap(layers)
                out = self.backbone(batch)
                self.forwards += 1
            if key is not None:
                self._memo[key] = (out, layers, [batch.get(k) for k in self.inputs])
        where = {layer: n for n, layer in enumerate(layers)}
        states = [out.hidden_states[where[i]] for i in layer_indices]
        final = states[-1] if self.backbone.final_is_last_tapped else out.final
        return BackboneOutput(states, out.mask, final)


    def _through_cache(self, batch: Dict, layers: List[int]) -> BackboneOutput:
        """Each row's states from the cache; the rows it lacks go through the backbone (one forward, at the
        batch's length) and are stored. Either way the states handed on are the cached ones (stored, then read
        back, in the backbone's configured dtype), so every epoch trains on the same values."""
        from unipt_scale.feature_cache import sample_keys

        if self.cache is None:
            self.cache = self._cache_factory(layers)
            self._cache_layers = list(layers)
        if layers != self._cache_layers:
            raise RuntimeError("the tapped layers changed after the feature cache opened")
        mask = self._mask(batch)
        keys = sample_keys(batch[self.inputs[0]], mask)
        rows = [self.cache.get(k) for k in keys]
        dtype, device = self.cache.state_dtype, None
        missing = [b for b, r in enumerate(rows) if r is None]
        self.cache.hits += len(keys) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            # The backbone runs on the rows the cache lacks (all of them on a first pass), at the batch's length.
            whole = len(missing) == len(keys)
            sub = batch if whole else {k: (v[missing] if torch.is_tensor(v) and v.dim() > 0
                                           and v.shape[0] == len(keys) else v) for k, v in batch.items()}
            sub_mask = mask if (whole or mask is None) else mask[missing]
            self.backbone.tap(layers)
            out = self.backbone(sub)
            self.forwards += 1
            device = out.final.device
            # The final output is stored only where it is not the last tapped state itself (BERT's is).
            final_apart = not self.backbone.final_is_last_tapped and not (
                out.final.shape == out.hidden_states[-1].shape and torch.equal(out.final, out.hidden_states[-1]))
            for j, b in enumerate(missing):
                sel = (lambda t: t[j][sub_mask[j]]) if sub_mask is not None else (lambda t: t[j])
                tensors = {f"layer{i}": sel(h) for i, h in zip(layers, out.hidden_states)}
                if final_apart:
                    tensors["final"] = sel(out.final)
                self.cache.put(keys[b], tensors)
            for b in missing:  # read back as stored (the rows already found are not read again)
                rows[b] = self.cache.get(keys[b])
        device = device or next(iter(v for v in batch.values() if torch.is_tensor(v))).device

        def assemble(name: str) -> torch.Tensor:
            parts = [r[name] for r in rows]
            if mask is None:
                return torch.stack(parts).to(device=device, dtype=dtype)
            full = torch.zeros(*mask.shape, parts[0].shape[-1], dtype=dtype, device=device)
            full[mask.to(device)] = torch.cat(parts).to(device=device, dtype=dtype)
            return full

        states = [assemble(f"layer{i}") for i in layers]
        final = assemble("final") if all("final" in r for r in rows) else states[-1]
        return BackboneOutput(states, mask, final)

    def _mask(self, batch: Dict) -> Optional[torch.Tensor]:
        if self.inputs[0] != "input_ids":
            return None
        attn = batch.get("attention_mask")
        return (attn if attn is not None else torch.ones_like(batch["input_ids"])).bool()

    def cache_estimate(self, num_samples: int, positions: int, dtype: str) -> int:
        """Disk bytes the cache will take for these samples (the tapped layers as the views now tap them, and the
        final output; an upper bound: padding is not stored)."""
        from unipt_scale.feature_cache import estimate_bytes

        sizes = self.backbone.all_hidden_sizes()
        widths = [sizes[i] for i in self._union()] + [self.backbone.out_dim]
        return estimate_bytes(num_samples, positions, widths, dtype)

    def sync_cache(self, barrier: Callable[[], None]) -> None:
        """Every rank's new states on disk, then indexed by every rank (collective; at an epoch's end): the next
        epoch's batches hold samples another rank computed in this one. Nothing to do (no barrier) without one."""
        if self._cache_factory is None:
            return
        if self.cache is not None:
            self.cache.flush()
        barrier()
        if self.cache is not None:
            self.cache.refresh()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


@contextlib.contextmanager
def shared_batch(backbones: Iterable[SharedBackbone]) -> Iterator[None]:
    """One block for several shared backbones (a retrieval model's two towers)."""
    with contextlib.ExitStack() as stack:
        for sb in backbones:
            stack.enter_context(sb.batch())
        yield


class BackboneView(FrozenBackbone):
    """The shared backbone as one model sees it: its own tapped layers, everything else the backbone's.

    The view registers the backbone's module under the same name (`model`), so a model built on a view has the
    same parameters, state-dict keys and trained-state rule as one built on the backbone itself."""

    def __init__(self, shared: SharedBackbone):
        super().__init__(shared.backbone.model)
        object.__setattr__(self, "_shared", shared)  # not a child module: the backbone is registered once, as model
        self.layer_indices = list(shared.backbone.layer_indices)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "_shared":
                raise
            return getattr(object.__getattribute__(self, "_shared").backbone, name)

    @property
    def kind(self) -> str:
        return self._shared.backbone.kind

    @property
    def is_feature_map(self) -> bool:
        return self._shared.backbone.is_feature_map

    @property
    def num_hidden_states(self) -> int:
        return self._shared.backbone.num_hidden_states

    def all_hidden_sizes(self) -> List[int]:
        return self._shared.backbone.all_hidden_sizes()

    @property
    def out_dim(self) -> int:
        return self._shared.backbone.out_dim

    def forward(self, batch: Dict[str, torch.Tensor]) -> BackboneOutput:
        return self._shared.read(self.layer_indices, batch)

    def forward_cached(self, *args, **kwargs):
        """Incremental decoding reads the backbone's own taps: this view's layers, set for the call."""
        backbone = self._shared.backbone
        backbone.tap(self.layer_indices)
        return backbone.forward_cached(*args, **kwargs)


def share_backbones(cfg, loaded: Dict[str, FrozenBackbone]) -> Dict[str, SharedBackbone]:
    """The loaded backbones of a config (by field) as shared ones, each with its tapped-state cache when
    data.feature_cache names a directory."""
    from unipt_scale.feature_cache import TappedStateCache, backbone_fingerprint

    def opener(name: str, bb: FrozenBackbone):
        bb_cfg = getattr(cfg, name)

        def open_cache(layers):
            identity = {"backbone": backbone_fingerprint(bb, bb_cfg, cfg.train.seed), "layers": list(layers),
                        "tower": name}
            cache = TappedStateCache(cfg.data.feature_cache, identity, cfg.data.feature_cache_dtype)
            cache.state_dtype = getattr(torch, bb_cfg.dtype)
            return cache

        return open_cache

    return {name: SharedBackbone(bb, cache=opener(name, bb) if cfg.data.feature_cache else None)
            for name, bb in loaded.items()}
