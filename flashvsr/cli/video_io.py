"""Streaming video I/O for the command line: decode frame by frame, encode frame by frame.

Nothing here holds more than one frame (plus the codec's own small buffers), so memory stays flat
however long the clip is. PyAV is imported inside the functions that need it: the ComfyUI nodes
never touch this module, and ``import comfyui_flashvsr`` must not require it.

Reading: a video file (anything FFmpeg decodes) or a folder of images (natural sort).
Writing: an ``.mp4`` / ``.mov`` / ``.mkv`` (H.264) or ``.webm`` (VP9) file, with the source's audio
carried over, or a folder of PNGs. Output is written under a temporary name and renamed into place
only when complete, so an interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from .output import discard, frame_name, partial_path, replace_with

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Video codec per output container. VP9 for WebM because WebM does not allow H.264.
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".m4v": "libx264", ".mkv": "libx264",
                ".webm": "libvpx-vp9"}
# Audio codecs each container takes as a stream copy; anything else is re-encoded (AUDIO_FALLBACK).
AUDIO_COPY_OK = {
    ".mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    ".m4v": {"aac", "mp3", "alac", "ac3", "eac3"},
    ".mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s24le", "pcm_f32le"},
    ".mkv": None,                                   # None = Matroska takes any codec
    ".webm": {"opus", "vorbis"},
}
AUDIO_FALLBACK = {".webm": "libopus"}               # others: "aac"
DEFAULT_FOLDER_FPS = Fraction(30)
# FFmpeg colour-space ids (AVColorSpace) -> swscale matrix names.
_MATRIX = {1: "itu709", 5: "itu601", 6: "itu601", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}


class VideoIOError(RuntimeError):
    """An input cannot be read or an output cannot be written; the message says what to do."""


def _require_av():
    try:
        import av
    except ImportError as exc:
        raise VideoIOError(
            "reading and writing video files needs PyAV: `pip install av` "
            f"(a folder of images in and out works without it); import failed: {exc}") from exc
    return av


def natural_key(name: str) -> list:
    """Sort key so that frame2.png comes before frame10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction
    frames: int | None        # exact for folders; the container's count for files (None if unknown)
    audio: str | None         # audio codec of the first audio stream, None if there is none
    is_folder: bool
    start: float = 0.0        # seconds at which the video stream starts (audio is shifted by it)


def probe(path: str | os.PathLike, fps: Fraction | None = None) -> VideoInfo:
    """Describe an input without decoding it (except the first image of a folder)."""
    path = Path(path)
    if not path.exists():
        raise VideoIOError(f"input not found: {path}")
    if path.is_dir():
        images = list_images(path)
        if not images:
            raise VideoIOError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        with _open_image(images[0]) as im:
            width, height = im.size
        return VideoInfo(path, width, height, Fraction(fps or DEFAULT_FOLDER_FPS), len(images),
                         None, True)
    av = _require_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoIOError(f"{path} has no video stream")
            vs = container.streams.video[0]
            rate = fps or vs.average_rate or vs.guessed_rate or vs.base_rate
            if not rate:
                log.warning("%s: frame rate unknown, writing at %s fps (set --fps)", path,
                            DEFAULT_FOLDER_FPS)
                rate = DEFAULT_FOLDER_FPS
            audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
            start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
            return VideoInfo(path, vs.codec_context.width, vs.codec_context.height,
                             Fraction(rate), vs.frames or None, audio, False, start)
    except av.FFmpegError as exc:
        raise VideoIOError(f"cannot read {path} as a video: {exc}") from exc


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Yield the frames of a video file or image folder as (H, W, 3) uint8 RGB arrays, one at a time.

    Every frame must have the size of the first one (a video super-resolution model cannot mix
    sizes); a folder with a differently sized image raises with its name.
    """
    path = Path(path)
    if path.is_dir():
        yield from _iter_folder(path)
    else:
        yield from _iter_video(path)


def _open_image(path: Path):
    """Pillow's image, or one line naming the file that cannot be read (not a traceback)."""
    from PIL import Image
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise VideoIOError(f"cannot read image {path}: {exc}; replace or remove it") from None


def _iter_folder(folder: Path) -> Iterator[np.ndarray]:
    from PIL import Image
    size = None
    for p in list_images(folder):
        with _open_image(p) as im:
            try:       # the pixels are decoded here: a truncated file fails now, not at open
                rgb = np.array(im.convert("RGB"))      # writable: torch.as_tensor warns on read-only
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise VideoIOError(f"cannot read image {p}: {exc}; replace or remove it") from None
        if size is None:
            size = rgb.shape
        elif rgb.shape != size:
            raise VideoIOError(f"{p} is {rgb.shape[1]}x{rgb.shape[0]} but the first image is "
                               f"{size[1]}x{size[0]}: all frames must have the same size")
        yield rgb


def _iter_video(path: Path) -> Iterator[np.ndarray]:
    av = _require_av()
    index, size = 0, None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:
                    raise VideoIOError(f"{path}: frame {index} is {frame.width}x{frame.height} but the video starts "
                                       f"at {size[0]}x{size[1]}: a video super-resolution model cannot mix sizes; "
                                       f"re-encode the video at one size (e.g. ffmpeg -vf scale={size[0]}:{size[1]})")
                yield _to_rgb(frame)
                index += 1
    except av.FFmpegError as exc:
        raise VideoIOError(f"{path}: cannot decode frame {index}: {exc}; the file is damaged or truncated "
                           "(re-encode or re-download it)") from None


def _to_rgb(frame) -> np.ndarray:
    """Convert with the matrix the file declares (BT.709 for HD when unspecified, as FFmpeg does)."""
    matrix = _MATRIX.get(int(frame.colorspace), "itu709" if frame.height >= 720 else "itu601")
    full_range = int(frame.color_range) == 2 or frame.format.name.startswith("yuvj")
    try:
        rgb = frame.reformat(format="rgb24", src_colorspace=matrix, dst_colorspace=matrix,
                             src_color_range="JPEG" if full_range else "MPEG",
                             dst_color_range="JPEG")
    except TypeError:                       # PyAV < 14.1 has no colour-range arguments
        rgb = frame.reformat(format="rgb24", src_colorspace=matrix)
    return rgb.to_ndarray()


def check_output(path: Path) -> None:
    """Raise if ``path`` cannot be written: unknown suffix or missing folder (checked up front)."""
    if path.suffix and path.suffix.lower() not in VIDEO_CODECS:
        raise VideoIOError(f"cannot write {path.name}: use one of {', '.join(VIDEO_CODECS)}, "
                           "or a name without suffix for PNG frames")
    if not path.parent.is_dir():
        raise VideoIOError(f"output folder does not exist: {path.parent}")


class _AudioCarrier:
    """Copies (or re-encodes) the source's first audio stream into the output, interleaved.

    Packets are pulled from a second demuxer of the source only up to the current video time, so the
    audio never piles up in memory and the output stays properly interleaved.
    """

    def __init__(self, av, source: Path, out, suffix: str, video_start: float) -> None:
        self._av, self._out = av, out
        self._in = av.open(str(source))
        self._ist = self._in.streams.audio[0]
        name = self._ist.codec_context.name
        allowed = AUDIO_COPY_OK.get(suffix, set())
        self.copy = allowed is None or name in allowed
        if self.copy:
            self._ost = out.add_stream_from_template(self._ist)
            self._source = self._in.demux(self._ist)
        else:
            codec = AUDIO_FALLBACK.get(suffix, "aac")
            rate = self._ist.codec_context.sample_rate or 48000
            rate = 48000 if codec == "libopus" else rate
            self._ost = out.add_stream(codec, rate=rate)
            self._resampler = av.AudioResampler(format=self._ost.codec_context.format.name,
                                                layout=self._ost.codec_context.layout.name, rate=rate)
            self._source = self._in.decode(self._ist)
            self._samples = 0
            log.info("audio: re-encoding %s as %s (%s cannot carry %s)", name, codec, suffix, name)
        self._shift = video_start   # seconds; the output video starts at 0
        self._pending = None
        self._done = False

    def _time(self, item) -> float:
        if item.pts is None or item.time_base is None:
            return float("-inf")
        return float(item.pts * item.time_base) - self._shift

    def mux_until(self, t: float | None) -> None:
        """Write audio up to output time ``t`` seconds (``None``: to the end) and flush at the end."""
        while not self._done:
            item = self._pending if self._pending is not None else next(self._source, None)
            self._pending = None
            if item is None:
                self._done = True
                break
            if t is not None and self._time(item) >= t:
                self._pending = item
                return
            self._write(item)
        if t is None:
            self._flush()

    def _write(self, item) -> None:
        if self.copy:
            if item.dts is None:                 # demuxer flush packet
                return
            shift = round(self._shift / item.time_base) if self._shift else 0
            if item.pts is not None and item.pts - shift + (item.duration or 0) < 0:
                return                           # lies entirely before the first video frame
            item.pts = None if item.pts is None else item.pts - shift
            item.dts -= shift
            item.stream = self._ost
            self._out.mux(item)
            return
        for frame in self._resampler.resample(item):
            self._encode(frame)

    def _encode(self, frame) -> None:
        if frame is not None:
            frame.pts, frame.time_base = self._samples, Fraction(1, frame.sample_rate)
            self._samples += frame.samples
        self._out.mux(self._ost.encode(frame))

    def _flush(self) -> None:
        if not self.copy:
            for frame in self._resampler.resample(None):
                self._encode(frame)
            self._encode(None)

    def close(self) -> None:
        self._in.close()


class VideoWriter:
    """Write RGB frames to a video file (with the source's audio) or a folder of PNGs, atomically.

    Use as a context manager. Frames go to a hidden temporary file beside ``path``; on a clean exit
    it is renamed to ``path``, on any exception (Ctrl-C included) it is deleted and ``path`` is left
    as it was.
    """

    def __init__(self, path: str | os.PathLike, fps: Fraction, *, audio_from: Path | None = None,
                 crf: int = 18, pix_fmt: str = "yuv420p", video_start: float = 0.0) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        self.audio_from, self.crf, self.pix_fmt, self.video_start = audio_from, crf, pix_fmt, video_start
        check_output(self.path)
        self.is_folder = self.path.suffix == ""
        self._suffix = self.path.suffix.lower()
        self._tmp = partial_path(self.path)
        self._container = self._stream = self._audio = None
        self.frames_written = 0
        self.size: tuple[int, int] | None = None      # (width, height) of the first frame

    def __enter__(self) -> "VideoWriter":
        if self.is_folder:
            self._tmp.mkdir()
        return self

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 frame, got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        if self.size is None:
            self.size = (w, h)
            if not self.is_folder:
                self._open(w, h)
        elif self.size != (w, h):
            raise ValueError(f"frame {self.frames_written} is {w}x{h}, earlier frames were "
                             f"{self.size[0]}x{self.size[1]}")
        if self.is_folder:
            from PIL import Image
            Image.fromarray(frame).save(self._tmp / frame_name(self.frames_written))
        else:
            self._encode(frame)
        self.frames_written += 1

    def _open(self, w: int, h: int) -> None:
        av = _require_av()
        self._container = av.open(str(self._tmp), mode="w")
        codec = VIDEO_CODECS[self._suffix]
        stream = self._container.add_stream(codec, rate=self.fps)
        subsampled = self.pix_fmt in ("yuv420p", "yuv422p")
        # 4:2:0 needs even sizes: pad one edge row/column rather than drop upscaled pixels.
        stream.width, stream.height = (w + w % 2, h + h % 2) if subsampled else (w, h)
        stream.pix_fmt = self.pix_fmt
        stream.codec_context.time_base = 1 / self.fps
        if codec == "libvpx-vp9":
            stream.options = {"crf": str(self.crf), "b:v": "0", "row-mt": "1"}
        else:
            stream.options = {"crf": str(self.crf), "preset": "medium"}
        for name, value in (("colorspace", 1), ("color_primaries", 1), ("color_trc", 1),
                            ("color_range", 1)):
            if hasattr(stream.codec_context, name):      # tag BT.709, limited range, as encoded
                setattr(stream.codec_context, name, value)
        self._stream = stream
        if self.audio_from is not None:
            with av.open(str(self.audio_from)) as probe_in:
                has_audio = bool(probe_in.streams.audio)
            if has_audio:
                self._audio = _AudioCarrier(av, self.audio_from, self._container, self._suffix,
                                            self.video_start)

    def _encode(self, frame: np.ndarray) -> None:
        av = _require_av()
        w, h = self._stream.width, self._stream.height
        if frame.shape[:2] != (h, w):
            frame = np.pad(frame, ((0, h - frame.shape[0]), (0, w - frame.shape[1]), (0, 0)),
                           mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        try:
            vf = vf.reformat(format=self.pix_fmt, src_colorspace="itu709", dst_colorspace="itu709",
                             src_color_range="JPEG", dst_color_range="MPEG")
        except TypeError:                       # PyAV < 14.1
            vf = vf.reformat(format=self.pix_fmt, dst_colorspace="itu709")
        vf.pts = self.frames_written
        if self._audio is not None:
            self._audio.mux_until(float(self.frames_written / self.fps))
        self._container.mux(self._stream.encode(vf))

    def _finish(self) -> None:
        if self.frames_written == 0:
            raise VideoIOError(f"no frames were written to {self.path}")
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            if self._audio is not None:
                self._audio.mux_until(None)
            self._close_container()
        replace_with(self._tmp, self.path)

    def _close_container(self) -> None:
        if self._audio is not None:
            self._audio.close()
            self._audio = None
        if self._container is not None:
            self._container.close()
            self._container = None

    def _discard(self) -> None:
        try:
            self._close_container()
        finally:
            discard(self._tmp)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._finish()
        except BaseException:
            self._discard()
            raise
