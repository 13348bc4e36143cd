"""A clip's frames: T of them, sampled uniformly over the clip (CLIP4Clip's uniform sampling), from a video file
(decoded with PyAV, the `video` extra) or from frame files stored beside it in the shard (KEY.f000.png, ...)."""
from __future__ import annotations

import io
import math
import re
from typing import List, Sequence

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
# A frame file's extension inside a sample: f000.png, f001.jpg, ... (the number orders them).
FRAME_MEMBER = re.compile(r"f(\d+)\.(?:jpg|jpeg|png|webp)")


class VideoDecodeError(ValueError):
    """A clip that cannot be decoded (bad bytes, no video stream, no frames)."""


def uniform_indices(available: int, wanted: int) -> List[int]:
    """`wanted` indices spread evenly over `available` frames, first and last included; a clip shorter than
    `wanted` repeats frames rather than padding, so every clip yields exactly `wanted`. Mirror-symmetric
    (index i of the clip played backwards is the mirror of index wanted-1-i), so a clip and its reversal give the
    same set of frames — but for the middle frame of an odd `wanted` from an even-length clip, which has no
    middle."""
    if available < 1:
        raise VideoDecodeError("the clip has no frames")
    if wanted == 1:
        return [(available - 1) // 2]
    out = [0] * wanted
    for i in range((wanted + 1) // 2):
        v = math.floor(i * (available - 1) / (wanted - 1) + 0.5)
        out[i], out[wanted - 1 - i] = v, available - 1 - v
    if wanted % 2:
        out[wanted // 2] = (available - 1) // 2
    return out


def frame_members(members: Sequence[str]) -> List[str]:
    """The frame-file extensions of a sample, in frame order."""
    found = [(int(m.group(1)), e) for e in members for m in [FRAME_MEMBER.fullmatch(e)] if m]
    return [e for _, e in sorted(found)]


def decode_video(data: bytes, wanted: int):
    """`wanted` PIL images sampled uniformly from an encoded video. Where the container states its frame count,
    only the sampled frames are converted to images as they are decoded; otherwise the decoded frames are kept
    (in their own YUV format, half an RGB image's bytes) and the sampled ones converted at the end."""
    try:
        import av
    except ImportError:
        raise VideoDecodeError("decoding video files needs PyAV: pip install 'unipt_scale[video]' (or write the "
                               "clips as frame files, KEY.f000.png ...)") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoDecodeError("the file holds no video stream")
            stated = container.streams.video[0].frames
            if stated > 0:
                picks = uniform_indices(stated, wanted)
                chosen = {}
                for n, frame in enumerate(container.decode(video=0)):
                    if n in picks:
                        chosen[n] = frame.to_image()
                if len(chosen) == len(set(picks)):
                    return [chosen[i] for i in picks]
                # The stated count was wrong (fewer frames decoded): decode again, keeping every frame.
                container.seek(0)
            frames = list(container.decode(video=0))
    except av.FFmpegError as exn:
        raise VideoDecodeError(f"cannot decode the clip: {exn}") from None
    if not frames:
        raise VideoDecodeError("the clip has no frames")
    return [frames[i].to_image() for i in uniform_indices(len(frames), wanted)]


def encode_video(frames, fps: int = 8, codec: str = "mpeg4") -> bytes:
    """An mp4 of PIL images (used by tests and by `unipt shards` when it writes clips as video files)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
