"""Regenerate ``assets/sample.mp4``: a synthetic 3-second test clip with a soundtrack.

Everything is drawn here (no third-party footage): a moving colour gradient, a scrolling
fine-detail grating, a bouncing disc, thin text and a two-tone chirp, so that an upscaler has
edges, texture and motion to work on and the audio carry-over can be heard and checked.
160x96 at 24 fps, 72 frames (more than FlashVSR's 21-frame minimum); x4 gives 640x384, both sides
multiples of 128. Deterministic for a given Pillow and PyAV version.

    python scripts/make_sample.py [OUT]      # default: assets/sample.mp4 next to this script's repo
"""
from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 160, 96, 24, 3
SAMPLE_RATE = 48000


def frame(i: int) -> np.ndarray:
    from PIL import Image, ImageDraw
    t = i / FPS
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / 23.0 + t * 1.7)
    g = 0.5 + 0.5 * np.sin(y / 17.0 - t * 1.1)
    b = 0.5 + 0.5 * np.cos((x + y) / 31.0 + t * 0.6)
    img = np.stack([r, g, b], -1) * 200 + 20
    band = y > HEIGHT * 0.68                       # a scrolling fine grating: texture to restore
    grating = 0.5 + 0.5 * np.sign(np.sin((x + 40 * t) * 1.3) * np.sin(y * 0.9))
    img[band] = (grating[band, None] * 180 + 40).repeat(3, -1)
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    cx = 20 + (WIDTH - 40) * abs(((t * 0.8) % 2) - 1)
    cy = 18 + 20 * abs(np.sin(t * 3.0))
    draw.ellipse((cx - 9, cy - 9, cx + 9, cy + 9), fill=(250, 240, 60), outline=(20, 20, 20))
    draw.text((6 + int(8 * np.sin(t)), 40), "FlashVSR 0123", fill=(255, 255, 255))
    draw.line((0, 60, WIDTH, 60 + 8 * np.sin(t * 2)), fill=(10, 10, 10), width=1)
    return np.asarray(im)


def tone() -> np.ndarray:
    t = np.arange(SAMPLE_RATE * SECONDS) / SAMPLE_RATE
    chirp = np.sin(2 * np.pi * (330 * t + 60 * t * t)) * 0.3
    beep = np.sin(2 * np.pi * 880 * t) * 0.2 * ((t % 1.0) < 0.1)   # a beep each second: sync marks
    return (chirp + beep).astype(np.float32)


def write(out: Path) -> None:
    import av
    with av.open(str(out), "w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"crf": "20", "preset": "veryslow"}
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        audio.bit_rate = 48000
        pcm, hop, done = tone(), 1024, 0
        for i in range(FPS * SECONDS):
            vf = av.VideoFrame.from_ndarray(frame(i), format="rgb24")
            vf.pts = i
            container.mux(video.encode(vf))
            while done < min(len(pcm), (i + 1) * SAMPLE_RATE // FPS):
                af = av.AudioFrame.from_ndarray(pcm[None, done:done + hop], format="fltp",
                                                layout="mono")
                af.sample_rate, af.pts, af.time_base = SAMPLE_RATE, done, Fraction(1, SAMPLE_RATE)
                container.mux(audio.encode(af))
                done += hop
        container.mux(video.encode(None))
        container.mux(audio.encode(None))


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "assets" / "sample.mp4"
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    target.parent.mkdir(parents=True, exist_ok=True)
    write(target)
    print(f"wrote {target} ({target.stat().st_size} bytes)")
