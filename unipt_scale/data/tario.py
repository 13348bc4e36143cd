"""Tar shards read by random access, past damage.

A streaming tar reader stops at the first bad header and the rest of the shard silently vanishes. Here a shard
is first scanned header by header (payloads are seeked over, not read); a damaged region is stepped over in
512-byte blocks until the next valid header, as `tar --ignore-zeros` does, and reported once. Samples are then
read by index, only the members a batch needs, so a resumed pass can start in the middle of a shard without
reading what came before it.

Local files are read in place. Remote URLs (``pipe:``, ``http://`` ...) and gzip-compressed tars cannot be
seeked: they are read whole into memory, one shard at a time per open group.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from dataclasses import dataclass, field

BLOCK = tarfile.BLOCKSIZE
_GZIP_MAGIC = b"\x1f\x8b"


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def split_name(name: str) -> tuple[str | None, str | None]:
    """'dir/KEY.a.b' -> ('dir/KEY', 'a.b'), the WebDataset rule (everything after the first dot of the base)."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if not dot or not key:
        return None, None
    return (f"{head}/{key}" if head else key), ext.lower()


def tar_problem(path: str) -> str | None:
    """Why `path` is not a tar shard (None when its first block looks like one): a cheap check at construction.

    A first header whose checksum is damaged but that still carries the ustar magic counts as a tar (the damage
    is then stepped over and reported when the shard is read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(BLOCK)
    except OSError as exn:
        return f"cannot be read ({exn.strerror or exn})"
    if not head:
        return "is empty (0 bytes)"
    if head[:2] == _GZIP_MAGIC:
        return None
    if len(head) == BLOCK:
        if head == bytes(BLOCK) or head[257:262] == b"ustar":
            return None
        try:
            tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
            return None
        except tarfile.HeaderError:
            pass
    return "is not a tar file (its first 512 bytes are not a tar header)"


@dataclass
class TarSample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)


@dataclass
class TarScan:
    samples: list[TarSample]
    problems: list[str]  # one line per damaged region, truncation or unreadable file


def _nonzero(f, start: int, end: int) -> bool:
    f.seek(start)
    left = end - start
    while left > 0:
        chunk = f.read(min(left, 1 << 20))
        if not chunk:
            return False
        if chunk.strip(b"\0"):
            return True
        left -= len(chunk)
    return False


def scan_tar(f, size: int) -> TarScan:
    """Members of a seekable tar grouped into samples (consecutive members with one key), in file order."""
    samples: list[TarSample] = []
    problems: list[str] = []
    try:
        tf = tarfile.TarFile(fileobj=f, mode="r", ignore_zeros=True)
    except tarfile.ReadError as exn:
        return TarScan([], [f"not a readable tar ({exn})"])
    expected = 0  # where the next header should start
    while True:
        try:
            m = tf.next()
        except tarfile.ReadError as exn:
            if tf.offset + BLOCK > size:
                problems.append(f"truncated at byte {size} ({exn})")
                break
            problems.append(f"unreadable header at byte {tf.offset} ({exn}); resynchronised")
            tf.offset += BLOCK
            expected = tf.offset
            continue
        if m is None:
            break
        tf.members = []  # the scan keeps its own list; tarfile's would grow with every member
        if m.offset > expected and _nonzero(f, expected, m.offset):
            problems.append(f"damaged bytes {expected}..{m.offset} (bad header); resynchronised at the next member")
        expected = tf.offset
        if m.offset_data + m.size > size:
            problems.append(f"truncated inside {m.name!r} (needs byte {m.offset_data + m.size}, file has {size})")
            return TarScan(samples, problems)
        if not m.isreg():
            continue
        key, ext = split_name(m.name)
        if key is None or (key.startswith("__") and "/" not in key):
            continue
        if not samples or samples[-1].key != key:
            samples.append(TarSample(key))
        if ext in samples[-1].members:
            problems.append(f"duplicate member {m.name!r} (the first is kept)")
            continue
        samples[-1].members[ext] = (m.offset_data, m.size)
    if not problems:
        end = expected
        if end < size and _nonzero(f, end, size):
            problems.append(f"damaged or cut-off bytes after the last member (from byte {end})")
        elif samples and size - end < 2 * BLOCK:
            problems.append(f"no end-of-archive marker after byte {end} (truncated at a member boundary?)")
    return TarScan(samples, problems)


class ShardReader:
    """One open shard: its scan, and payloads read on demand."""

    def __init__(self, url: str):
        self.url = url
        self._f = None
        self._fd = None
        try:
            if is_remote(url):
                from webdataset.gopen import gopen

                with gopen(url, "rb") as stream:
                    data = stream.read()
                self._f = io.BytesIO(gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data)
            else:
                raw = open(url, "rb")
                if raw.read(2) == _GZIP_MAGIC:
                    raw.seek(0)
                    with raw:
                        self._f = io.BytesIO(gzip.decompress(raw.read()))
                else:
                    raw.seek(0)
                    self._f, self._fd = raw, raw.fileno()
        except (OSError, EOFError, ValueError) as exn:
            self.scan = TarScan([], [f"cannot be read: {type(exn).__name__}: {exn}"])
            self.close()
            return
        size = os.fstat(self._fd).st_size if self._fd is not None else len(self._f.getbuffer())
        self.scan = scan_tar(self._f, size)

    def __len__(self) -> int:
        return len(self.scan.samples)

    def read(self, i: int, exts, match: "re.Pattern[str] | None" = None) -> dict:
        """Sample `i` with the payloads of the members named in `exts` or whose extension `match` matches in full
        (a video's frame files, f000.png, f001.png, ...); the others are not read."""
        s = self.scan.samples[i]
        out = {"__key__": s.key, "__url__": self.url, "__members__": tuple(s.members)}
        wanted = list(exts)
        if match is not None:
            wanted += [e for e in s.members if e not in wanted and match.fullmatch(e)]
        for ext in wanted:
            loc = s.members.get(ext)
            if loc is None:
                continue
            off, n = loc
            if self._fd is not None:
                data = os.pread(self._fd, n, off)
            else:
                data = bytes(self._f.getbuffer()[off:off + n])
            if len(data) != n:  # the file shrank after the scan
                raise OSError(f"{self.url}: member {s.key}.{ext} cut short ({len(data)} of {n} bytes)")
            out[ext] = data
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = self._fd = None
