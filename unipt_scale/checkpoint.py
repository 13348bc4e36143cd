"""Resumable checkpoints: one manager for both engines.

Layout under OUTPUT_DIR/checkpoints/:

    step00000100/            one complete checkpoint
        manifest.json        written last: every other file with its sha256 and size, step, world size, config
        rank0.json           trainer state of rank 0 (TrainState, RNG streams' JSON part)
        rank0.safetensors    rank 0's RNG tensors
        engine.*             / deepspeed/...: the engine's own state (engine.save_state)
    latest                   name of the newest complete checkpoint (for people and tools; resume itself takes
                             the newest checkpoint that verifies)

A checkpoint is built in a hidden `.tmp-stepN` directory, its manifest is written last, and only then is it
renamed into place and `latest` updated, so a crash at any instant leaves every `stepN` directory complete. Resume
verifies the manifest (every file's sha256) and that every state file parses as its kind (safetensors header, JSON,
DeepSpeed's pickles scanned without running them: a manifest rewritten to match other bytes passes the sha256
check), falls back to the newest complete checkpoint when `latest` is torn or a checkpoint is damaged, and says
which one it took. The project's own state files hold no pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Callable, Iterator, List, Optional, Tuple

from unipt_scale.atomic import atomic_write_json, atomic_write_text, fsync_dir

log = logging.getLogger("unipt_scale")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "unipt_scale.checkpoint/1"
_NAME = re.compile(r"^step(\d{8,})$")

# Config keys a resumed run may change: they do not alter what is computed, only where and how it is reported.
RESUMABLE_CHANGES = ("output_dir", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.tensorboard", "train.num_threads", "train.on_nonfinite", "train.max_nonfinite_steps",
                     "train.log_every", "train.eval_every", "data.num_workers", "data.eval_batch_size",
                     "data.cache_dir")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def comparable_config(config: dict) -> dict:
    """The config keys that decide what a run computes (everything but RESUMABLE_CHANGES)."""
    return {k: v for k, v in _flatten(config).items() if k not in RESUMABLE_CHANGES}


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(comparable_config(config), sort_keys=True, default=str).encode()).hexdigest()


def step_name(step: int) -> str:
    return f"step{step:08d}"


def _step_of(name: str) -> Optional[int]:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _files_under(directory: str) -> List[str]:
    out = []
    for base, _dirs, names in os.walk(directory):
        for n in names:
            out.append(os.path.relpath(os.path.join(base, n), directory))
    return sorted(out)


def state_file_problem(path: str) -> Optional[str]:
    """Why a state file cannot be read as what its name says (None when it can): the safetensors header, the
    JSON text, a DeepSpeed pickle's referenced globals. Cheap: no tensor payload is read."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as err:
            return f"is not a readable safetensors file ({_first_line(err)})"
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            return f"is not JSON ({_first_line(err)})"
    elif path.endswith(".pt"):
        from unipt_scale.deepspeed_engine import pickle_problem

        return pickle_problem(path)
    return None


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def verify(directory: str, world_size: Optional[int] = None, config: Optional[dict] = None) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming what is wrong otherwise."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is incomplete (no {MANIFEST}: its writer stopped before the end)")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise KeyError("format")
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a unipt checkpoint manifest (damaged or from another tool)") from None
    for rel, entry in files.items():
        full = os.path.normpath(os.path.join(directory, rel))
        if os.path.isabs(rel) or not full.startswith(os.path.normpath(directory) + os.sep):
            raise CheckpointError(f"{path} names a file outside its checkpoint ({rel!r}); refusing it")
        if not os.path.isfile(full):
            raise CheckpointError(f"{full} is missing (listed in {MANIFEST})")
        if os.path.getsize(full) != entry["bytes"] or sha256_file(full) != entry["sha256"]:
            raise CheckpointError(f"{full} does not match its sha256 in {MANIFEST}: the file was changed or damaged")
    extra = [f for f in _files_under(directory) if f != MANIFEST and f not in files]
    if extra:
        raise CheckpointError(f"{os.path.join(directory, extra[0])} is not listed in {MANIFEST}; the checkpoint was "
                              "tampered with")
    if world_size is not None and manifest["world_size"] != world_size:
        raise CheckpointError(f"{directory} was written by {manifest['world_size']} rank(s) and this run has "
                              f"{world_size}; resume with the same world size")
    if config is not None and manifest.get("config_hash") != config_hash(config):
        then, now = comparable_config(manifest.get("config", {})), comparable_config(config)
        diff = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        raise CheckpointError(f"{directory} was written with another config (differs in {', '.join(diff[:6])}); "
                              "resume with the config it was written with")
    for rel in sorted(files):
        full = os.path.join(directory, rel)
        problem = state_file_problem(full)
        if problem is not None:
            raise CheckpointError(f"{full} {problem}, though its sha256 matches {MANIFEST}: the checkpoint is "
                                  "damaged")
    return manifest


def _refused_by_choice(err: CheckpointError) -> bool:
    """An intact checkpoint of another run (world size, config): never skipped for an older one."""
    return "world size" in str(err) or "another config" in str(err)


def _steps_newest_first(root: str) -> List[str]:
    return sorted((n for n in os.listdir(root) if _step_of(n) is not None), key=_step_of, reverse=True)


def _checked(root: str, names: List[str], world_size: int, config: dict
             ) -> Iterator[Tuple[str, Optional[CheckpointError]]]:
    """Each checkpoint of `names`, in order, with why it cannot be resumed from (None: intact), verified only as
    the caller asks for the next one; one of another config or world size is refused outright, as a resume
    refuses it."""
    for name in names:
        try:
            verify(os.path.join(root, name), world_size, config)
        except CheckpointError as err:
            if _refused_by_choice(err):
                raise
            yield name, err
            continue
        yield name, None


def intact_steps(output_dir: str, config: dict, world_size: int = 1) -> List[int]:
    """The steps of a run's intact checkpoints of this config, newest first (damaged ones left out)."""
    root = os.path.join(os.path.abspath(output_dir), CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    return [_step_of(name) for name, err in _checked(root, _steps_newest_first(root), world_size, config)
            if err is None]


def checkpoint_of(output_dir: str, step: int) -> str:
    return os.path.join(os.path.abspath(output_dir), CHECKPOINTS, step_name(step))


class CheckpointManager:
    """Saves and finds resumable checkpoints. Collective where it takes `barrier`: every rank calls save()."""

    def __init__(self, output_dir: str, rank: int, world_size: int, config: dict, keep: int,
                 barrier: Callable[[], None] = lambda: None):
        self.root = os.path.join(os.path.abspath(output_dir), CHECKPOINTS)
        self.rank, self.world_size, self.config, self.keep = rank, world_size, config, keep
        self.barrier = barrier

    # ------------------------------------------------------------------------------------------- saving

    def save(self, step: int, write: Callable[[str], None]) -> str:
        """`write(directory)` runs on every rank and writes that rank's files; rank 0 then commits."""
        tmp = os.path.join(self.root, f".tmp-{step_name(step)}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.barrier()
        write(tmp)
        self.barrier()
        final = os.path.join(self.root, step_name(step))
        if self.rank == 0:
            self._commit(tmp, final, step)
        self.barrier()
        return final

    def _commit(self, tmp: str, final: str, step: int) -> None:
        files = {}
        for rel in _files_under(tmp):
            full = os.path.join(tmp, rel)
            with open(full, "rb") as fh:
                os.fsync(fh.fileno())
            files[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
        for base, _dirs, _names in os.walk(tmp):
            fsync_dir(base)
        manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                    "config_hash": config_hash(self.config), "config": self.config, "files": files}
        atomic_write_json(os.path.join(tmp, MANIFEST), manifest)  # last: from here on the checkpoint is complete
        if os.path.exists(final):
            aside = os.path.join(self.root, f".old-{os.path.basename(final)}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        self._prune(step)

    def _prune(self, step: int) -> None:
        """Keep the newest `keep` checkpoints up to `step`; later ones belong to a run this one replaced."""
        named = sorted(((s, n) for n in os.listdir(self.root) if (s := _step_of(n)) is not None), reverse=True)
        kept = [n for s, n in named if s <= step][: self.keep]
        for s, n in named:
            if n not in kept:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    # ------------------------------------------------------------------------------------------ finding

    def find(self, spec: str) -> Tuple[Optional[str], List[str]]:
        """(checkpoint directory to resume from or None for a fresh start, notes for the log). Rank 0 only."""
        if spec == "auto":
            return self._newest_valid(self.root, explicit=False)
        path = os.path.abspath(os.path.expanduser(spec))
        if os.path.isfile(os.path.join(path, MANIFEST)) or _step_of(os.path.basename(path)) is not None:
            try:
                verify(path, self.world_size, self.config)
            except CheckpointError as err:
                if _refused_by_choice(err):
                    raise
                raise CheckpointError(f"{err}; set train.resume to another checkpoint, or to its checkpoints/ "
                                      "directory for the newest intact one") from None
            return path, []
        if os.path.isdir(os.path.join(path, CHECKPOINTS)):
            path = os.path.join(path, CHECKPOINTS)
        if not os.path.isdir(path):
            raise CheckpointError(f"train.resume={spec!r} does not exist; give auto, an output directory, its "
                                  "checkpoints/ directory or one stepN checkpoint in it")
        found, notes = self._newest_valid(path, explicit=True)
        return found, notes

    def _newest_valid(self, root: str, explicit: bool) -> Tuple[Optional[str], List[str]]:
        if not os.path.isdir(root):
            if explicit:
                raise CheckpointError(f"{root} holds no checkpoint")
            return None, []
        order = _steps_newest_first(root)
        notes = []
        hint = None
        try:
            with open(os.path.join(root, LATEST), encoding="utf-8") as fh:
                hint = fh.read().strip()
        except (OSError, UnicodeDecodeError):
            pass
        if os.path.exists(os.path.join(root, LATEST)) and hint not in order:
            notes.append(f"{os.path.join(root, LATEST)} is torn or names no checkpoint ({hint!r}); taking the "
                         "newest complete checkpoint instead")
        if not order:
            if explicit:
                raise CheckpointError(f"{root} holds no checkpoint")
            return None, notes
        reasons = []
        for n, err in _checked(root, order, self.world_size, self.config):
            if err is not None:
                reasons.append(str(err))
                notes.append(f"skipping {n}: {err}")
                continue
            if reasons:
                notes.append(f"resuming from {n}, the newest complete checkpoint")
            return os.path.join(root, n), notes
        raise CheckpointError(f"no checkpoint under {root} is intact ({'; '.join(reasons[:3])}); move the damaged "
                              "ones away, or set train.resume='' to start over")
