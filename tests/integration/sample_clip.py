"""Write a small synthetic test clip (moving pattern + a sine tone) with PyAV.

Runs in ComfyUI's venv, which has PyAV and numpy::

    <workdir>/venv/bin/python tests/integration/sample_clip.py OUT.mp4 [--frames 12 --width 48 --height 32]
"""
from __future__ import annotations

import argparse
import fractions
import sys

import av
import numpy as np


def frame_rgb(i: int, width: int, height: int) -> np.ndarray:
    """A diagonal colour ramp with a bright square moving one step per frame: motion, edges, colour."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([(x + 3 * i) % width / width, y / height,
                    ((x + y) / (width + height) + 0.1 * i) % 1.0], -1)
    side = max(4, min(width, height) // 4)
    top, left = (2 * i) % (height - side), (3 * i) % (width - side)
    img[top:top + side, left:left + side] = 1.0
    return (img * 255).astype(np.uint8)


def write_clip(path: str, frames: int = 12, width: int = 48, height: int = 32, fps: int = 12,
               sample_rate: int = 16000) -> None:
    with av.open(path, "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": "10"}
        audio = out.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_rgb(i, width, height), format="rgb24")
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        seconds = frames / fps
        t = np.arange(int(seconds * sample_rate), dtype=np.float32) / sample_rate
        tone = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        step = 1024
        for start in range(0, tone.size, step):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + step], format="fltp", layout="mono")
            chunk.sample_rate = sample_rate
            chunk.pts = start
            chunk.time_base = fractions.Fraction(1, sample_rate)
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)


def probe(path: str) -> dict:
    """Frames, size and whether there is audio: what the integration test checks on outputs."""
    with av.open(path) as f:
        vs = f.streams.video[0]
        n = sum(1 for _ in f.decode(vs))
        return {"frames": n, "width": vs.codec_context.width, "height": vs.codec_context.height,
                "audio": len(f.streams.audio) > 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--fps", type=int, default=12)
    p.add_argument("--probe", action="store_true", help="print frames/size/audio of OUT as JSON instead")
    a = p.parse_args(argv)
    if a.probe:
        import json
        print(json.dumps(probe(a.out)))
        return 0
    write_clip(a.out, a.frames, a.width, a.height, a.fps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
