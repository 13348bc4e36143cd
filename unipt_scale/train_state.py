"""The trainer's explicit state, and the RNG streams, as JSON + tensors (never pickle).

Everything a resumed run needs to continue exactly where the checkpoint was taken: the step, the epoch and the
data position inside it, the loss and eval histories, the loss window not yet logged, skip counters, and every
RNG stream (Python, NumPy, torch CPU and CUDA).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional, Tuple

import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch being iterated (or about to be)
    epoch_batches: int = 0  # micro batches of `epoch` consumed so far (a run that stops at its last one ran the epoch)
    data_position: dict = field(default_factory=dict)  # the train loader's state_dict inside `epoch`
    samples: int = 0  # samples this rank trained on
    train_loss: List[list] = field(default_factory=list)  # [step, mean loss or None]
    val_history: List[dict] = field(default_factory=list)
    window_sum: float = 0.0  # loss of the micro batches since the last logged value
    window_count: int = 0
    skipped_steps: int = 0  # non-finite steps dropped (train.on_nonfinite=skip)
    train_time_s: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def capture_rng() -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Every RNG stream of this process as (JSON part, tensors)."""
    py = random.getstate()
    meta: dict = {"python": [py[0], list(py[1]), py[2]]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
        meta["numpy"] = [name, int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return meta, tensors


def restore_rng(meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng.cuda.{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    if "numpy" in meta and "rng.numpy" in tensors:
        import numpy as np

        name, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


@contextlib.contextmanager
def preserved_rng():
    """Every RNG stream of the process as it was, after the block (building a model to serve it reseeds them)."""
    meta, tensors = capture_rng()
    try:
        yield
    finally:
        restore_rng(meta, tensors)


def finite_or_none(value: Optional[float]) -> Optional[float]:
    """metrics.json is strict JSON: a non-finite number is written as null."""
    if value is None:
        return None
    value = float(value)
    return value if value == value and value not in (float("inf"), float("-inf")) else None
