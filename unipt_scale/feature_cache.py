"""The tapped-state cache: what the frozen forward gave each sample, written once and read instead of running it.

A frozen backbone maps a sample to the same tapped states every epoch and every run, so for small data trained
for several epochs, or a sweep run again, the forward need not run twice. The states are kept per sample (the
batches of a later epoch are other combinations of the same samples), keyed by the sha256 of what the backbone
reads of that sample (its real tokens, or its pixels), under a directory keyed by everything that decides them:
the backbone (path and config.json), its dtype and quantization, the tapped layers and the storage format.

Storage: WebDataset shards (tar; one `KEY.states.safetensors` member per sample, read back by random access
through unipt_scale.data.tario), each written atomically once it holds `shard_samples` samples or the run ends.
Per layer a sample keeps its real positions only (padding is not stored; it reads back as zeros, which the
side network masks), as float32 (exact), float16, or int8 with one float32 scale per position (absmax / 127).
A shard that cannot be read is skipped with a warning; its samples are computed again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from unipt_scale.atomic import atomic_write_bytes, atomic_write_json

log = logging.getLogger("unipt_scale")

CACHE_FORMAT = "unipt-tapped-states/1"
CACHE_DTYPES = ("float32", "float16", "int8")
MEMBER = "states.safetensors"


def sample_keys(batch: Dict, mask: Optional[torch.Tensor]) -> List[str]:
    """Per row: sha256 of what the backbone reads of it (real token ids, or the pixel values)."""
    keys = []
    if torch.is_tensor(batch.get("input_ids")):
        ids = batch["input_ids"].detach().to("cpu", torch.int64)
        rows = ids.unbind(0) if mask is None else [r[m] for r, m in zip(ids, mask.cpu())]
        for r in rows:
            keys.append(hashlib.sha256(r.contiguous().numpy().tobytes()).hexdigest())
    else:
        px = batch["pixel_values"].detach().to("cpu", torch.float32)
        for r in px:
            keys.append(hashlib.sha256(r.contiguous().numpy().tobytes()).hexdigest())
    return keys


def _encode(t: torch.Tensor, dtype: str) -> Dict[str, torch.Tensor]:
    t = t.detach().to("cpu", torch.float32).contiguous()
    if dtype == "float32":
        return {"x": t}
    if dtype == "float16":
        return {"x": t.to(torch.float16)}
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(t.shape).contiguous(), "scale": scale.contiguous()}


def _decode(parts: Dict[str, torch.Tensor]) -> torch.Tensor:
    if "x" in parts:
        return parts["x"].to(torch.float32)
    q, scale = parts["q"], parts["scale"]
    flat = q.reshape(q.shape[0], -1) if q.dim() > 1 else q.reshape(1, -1)
    return (flat.to(torch.float32) * scale[:, None]).reshape(q.shape)


def backbone_fingerprint(backbone, bb_cfg) -> dict:
    """What decides a backbone's states besides its inputs: its path, config.json, dtype and quantization."""
    model_config = getattr(getattr(backbone, "model", None), "config", None)
    text = model_config.to_json_string() if hasattr(model_config, "to_json_string") else ""
    return {"path": bb_cfg.path, "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "dtype": bb_cfg.dtype, "quantization": bb_cfg.quantization, "random_init": bb_cfg.random_init,
            "kind": getattr(backbone, "kind", ""), "class": type(getattr(backbone, "model", backbone)).__name__}


def estimate_bytes(num_samples: int, positions: int, widths: Sequence[int], dtype: str) -> int:
    """Disk bytes of the cache for `num_samples` samples of `positions` real positions (tokens, or H*W of a
    feature map, per layer where widths differ) over layers of `widths`: the planner's figure."""
    per_value = {"float32": 4, "float16": 2, "int8": 1}[dtype]
    scales = 4 * positions * len(widths) if dtype == "int8" else 0
    return int(num_samples * (positions * sum(widths) * per_value + scales + 1024))  # + tar and header bytes


class TappedStateCache:
    """Per-sample tapped states of one backbone configuration (see the module docstring)."""

    def __init__(self, root: str, identity: dict, dtype: str = "float16", shard_samples: int = 256):
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
        self.identity = {"format": CACHE_FORMAT, "dtype": dtype, **identity}
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = os.path.join(os.path.abspath(os.path.expanduser(root)), digest)
        self.dtype, self.shard_samples = dtype, shard_samples
        os.makedirs(self.dir, exist_ok=True)
        ident = os.path.join(self.dir, "identity.json")
        if not os.path.isfile(ident):
            atomic_write_json(ident, self.identity)
        self._readers: list = []
        self._index: Dict[str, tuple] = {}
        self._pending: Dict[str, bytes] = {}
        self.hits = self.misses = 0
        self.state_dtype = torch.float32  # the dtype states are handed on in (the backbone's)
        self._load_index()

    def _load_index(self) -> None:
        from unipt_scale.data.tario import ShardReader

        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".tar"):
                continue
            reader = ShardReader(os.path.join(self.dir, name))
            if reader.scan.problems:
                log.warning("feature cache: %s is damaged (%s); its samples are computed again", name,
                            reader.scan.problems[0])
            self._readers.append(reader)
            for i, s in enumerate(reader.scan.samples):
                if MEMBER in s.members:
                    self._index.setdefault(s.key, (reader, i))

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def get(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        """The sample's tensors (layer states, decoded to float32), or None when it is not cached (or unreadable)."""
        data = self._pending.get(key)
        if data is None:
            where = self._index.get(key)
            if where is None:
                return None
            reader, i = where
            try:
                data = reader.read(i, [MEMBER])[MEMBER]
            except (OSError, KeyError) as err:
                log.warning("feature cache: sample %s unreadable (%s); computed again", key[:12], err)
                self._index.pop(key, None)
                return None
        try:
            raw = load_tensors(data)
        except Exception as err:  # a damaged member: recompute rather than train on garbage
            log.warning("feature cache: sample %s undecodable (%s); computed again", key[:12], err)
            self._index.pop(key, None)
            return None
        names = sorted({k.rsplit(".", 1)[0] for k in raw})
        return {n: _decode({k.rsplit(".", 1)[1]: v for k, v in raw.items() if k.rsplit(".", 1)[0] == n})
                for n in names}

    def put(self, key: str, tensors: Dict[str, torch.Tensor]) -> None:
        if key in self._index or key in self._pending:
            return
        flat = {f"{name}.{part}": v for name, t in tensors.items() for part, v in _encode(t, self.dtype).items()}
        self._pending[key] = save_tensors(flat)
        if len(self._pending) >= self.shard_samples:
            self.flush()

    def flush(self) -> None:
        """Write the pending samples as one shard, atomically (a crash leaves no partial shard)."""
        if not self._pending:
            return
        from unipt_scale.data.tario import ShardReader

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for key, data in self._pending.items():
                info = tarfile.TarInfo(f"{key}.{MEMBER}")
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
        name = f"shard-{time.time_ns():x}-{os.getpid()}.tar"
        path = os.path.join(self.dir, name)
        atomic_write_bytes(path, buf.getvalue())
        reader = ShardReader(path)
        self._readers.append(reader)
        for i, s in enumerate(reader.scan.samples):
            self._index.setdefault(s.key, (reader, i))
        self._pending = {}

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.dir, n)) for n in os.listdir(self.dir) if n.endswith(".tar"))

    def close(self) -> None:
        self.flush()
        for r in self._readers:
            r.close()
        self._readers = []
