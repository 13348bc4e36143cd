"""A clip's frames: T of them, sampled uniformly over the clip (CLIP4Clip's uniform sampling), from a video file
(decoded with PyAV, the `video` extra) or from frame files stored beside it in the shard (KEY.f000.png, ...)."""
from __future__ import annotations

import io
import re
from typing import List, Sequence

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
# A frame file's extension inside a sample: f000.png, f001.jpg, ... (the number orders them).
FRAME_MEMBER = re.compile(r"f(\d+)\.(?:jpg|jpeg|png|webp)")


class VideoDecodeError(ValueError):
    """A clip that cannot be decoded (bad bytes, no video stream, no frames)."""


def uniform_indices(available: int, wanted: int) -> List[int]:
    """`wanted` indices spread evenly over `available` frames, first and last included; a clip shorter than
    `wanted` repeats frames rather than padding, so every clip yields exactly `wanted`."""
    if available < 1:
        raise VideoDecodeError("the clip has no frames")
    if wanted == 1:
        return [available // 2]
    return [round(i * (available - 1) / (wanted - 1)) for i in range(wanted)]


def frame_members(members: Sequence[str]) -> List[str]:
    """The frame-file extensions of a sample, in frame order."""
    found = [(int(m.group(1)), e) for e in members for m in [FRAME_MEMBER.fullmatch(e)] if m]
    return [e for _, e in sorted(found)]


def decode_video(data: bytes, wanted: int):
    """`wanted` PIL images sampled uniformly from an encoded video. Every frame is decoded (clips are short)
    and only the sampled ones kept as images."""
    try:
        import av
    except ImportError:
        raise VideoDecodeError("decoding video files needs PyAV: pip install 'unipt_scale[video]' (or write the "
                               "clips as frame files, KEY.f000.png ...)") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoDecodeError("the file holds no video stream")
            frames = [f.to_image() for f in container.decode(video=0)]
    except av.FFmpegError as exn:
        raise VideoDecodeError(f"cannot decode the clip: {exn}") from None
    return [frames[i] for i in uniform_indices(len(frames), wanted)]


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
