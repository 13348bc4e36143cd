"""One frozen forward for several side networks.

Nothing in a frozen, no-grad backbone depends on what is trained, so every model that reads it through
`FrozenBackbone.forward` (UniPT, the ladder, the linear probe) can share one forward per batch. A `SharedBackbone`
owns the loaded backbone and hands out `BackboneView`s, one per model: each view taps its own layers and behaves
as the backbone itself (same attributes, same state-dict keys), while inside `SharedBackbone.batch(...)` the
backbone runs once over the union of the views' layers and every view reads its own slice of that one output.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from unipt_scale.backbone import BackboneOutput, FrozenBackbone

INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def _input_key(batch: Dict) -> Tuple:
    """The inputs a backbone reads, by the memory they occupy and their in-place version: the same rows of the same
    batch give the same key for every view (a slice taken again included), a different batch or an edited one
    another. The memo holds the inputs themselves, so their memory cannot be reused for other data meanwhile."""
    key = []
    for name in INPUT_KEYS:
        t = batch.get(name)
        key.append(None if not torch.is_tensor(t) else
                   (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version))
    return tuple(key)


class SharedBackbone:
    """A loaded frozen backbone whose forward several views share (see the module docstring)."""

    def __init__(self, backbone: FrozenBackbone):
        self.backbone = backbone
        self.views: List["BackboneView"] = []
        self._open = False
        self._memo: Dict[Tuple, Tuple[BackboneOutput, List[int], list]] = {}
        self.forwards = 0  # frozen forwards run (the sharing is measurable)

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

    def output_for(self, view: "BackboneView", batch: Dict) -> BackboneOutput:
        key = _input_key(batch) if self._open else None
        if key is not None and key in self._memo:
            out, layers, _inputs = self._memo[key]
        else:
            layers = self._union() if self._open else list(view.layer_indices)
            self.backbone.tap(layers)
            out = self.backbone(batch)
            self.forwards += 1
            if key is not None:
                self._memo[key] = (out, layers, [batch.get(k) for k in INPUT_KEYS])
        where = {layer: n for n, layer in enumerate(layers)}
        states = [out.hidden_states[where[i]] for i in view.layer_indices]
        final = states[-1] if self.backbone.final_is_last_tapped else out.final
        return BackboneOutput(states, out.mask, final)


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
        return self._shared.output_for(self, batch)
