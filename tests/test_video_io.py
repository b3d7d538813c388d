"""Video I/O for the command line: streaming decode/encode, audio carried over, atomic output."""
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from comfyui_flashvsr.flashvsr.cli import video_io
from comfyui_flashvsr.flashvsr.cli.video_io import VideoIOError, VideoWriter, iter_frames, probe

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.mp4"


def _stream_order(path: Path) -> list[str]:
    with av.open(str(path)) as c:
        return [p.stream.type for p in c.demux() if p.size]


def _audio_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        return sum(p.duration for p in c.demux(s) if p.size) * float(s.time_base)


def test_sample_roundtrip_keeps_frames_fps_size_and_interleaved_audio(tmp_path):
    src = probe(SAMPLE)
    out = tmp_path / "up.mp4"
    with VideoWriter(out, src.fps, audio_from=SAMPLE) as w:
        for f in iter_frames(SAMPLE):
            w.write(f.repeat(2, 0).repeat(2, 1))
    got = probe(out)
    assert (got.width, got.height) == (2 * src.width, 2 * src.height)
    assert (got.fps, got.frames) == (src.fps, src.frames)
    assert got.audio == "aac"
    assert _audio_seconds(out) == pytest.approx(_audio_seconds(SAMPLE), abs=0.03)
    order = _stream_order(out)
    # interleaved, not appended: audio shows up before the last video packet
    assert order.index("audio") < len(order) - order[::-1].index("video") - 1


def test_colours_survive_encode_and_decode_within_4_levels(tmp_path):
    colours = np.array([[200, 50, 30], [20, 180, 240], [128, 128, 128], [250, 250, 10]], np.uint8)
    out = tmp_path / "c.mp4"
    with VideoWriter(out, Fraction(24)) as w:
        for c in colours:
            w.write(np.broadcast_to(c, (64, 96, 3)).copy())
    got = np.array([f[32, 48] for f in iter_frames(out)], dtype=int)
    assert np.abs(got - colours).max() <= 4


def test_odd_size_is_padded_to_even_without_moving_pixels(tmp_path):
    frame = np.zeros((17, 33, 3), np.uint8)
    frame[:, :16] = 255
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, Fraction(10)) as w:
        w.write(frame)
    (back,) = list(iter_frames(out))
    assert back.shape == (18, 34, 3)
    assert back[8, 4].min() > 230 and back[8, 28].max() < 25


def test_webm_output_reencodes_aac_audio_as_opus(tmp_path):
    out = tmp_path / "x.webm"
    with VideoWriter(out, Fraction(24), audio_from=SAMPLE) as w:
        for _ in range(6):
            w.write(np.full((64, 64, 3), 90, np.uint8))
    assert probe(out).audio == "opus"
    assert _audio_seconds(out) == pytest.approx(3.0, abs=0.1)


def test_interrupted_write_leaves_previous_output_untouched_and_no_partial_file(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, Fraction(24), audio_from=SAMPLE) as w:
            for _ in range(5):
                w.write(np.zeros((32, 32, 3), np.uint8))
            raise KeyboardInterrupt
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]


def test_png_folder_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "frames"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, Fraction(24)) as w:
            w.write(np.zeros((8, 8, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with VideoWriter(out, Fraction(24)) as w:
        for i in range(3):
            w.write(np.full((8, 8, 3), i * 50, np.uint8))
    assert [f[0, 0, 0] for f in iter_frames(out)] == [0, 50, 100]


def test_image_folder_is_read_in_natural_order(tmp_path):
    from PIL import Image
    for i in (1, 10, 2):
        Image.fromarray(np.full((4, 6, 3), i, np.uint8)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [f[0, 0, 0] for f in iter_frames(tmp_path)] == [1, 2, 10]
    info = probe(tmp_path, fps=Fraction(12))
    assert (info.width, info.height, info.frames, info.fps, info.audio) == (6, 4, 3, 12, None)


def test_image_folder_with_a_differently_sized_image_names_it(tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "a1.png")
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "a2.png")
    with pytest.raises(VideoIOError, match=r"a2\.png is 6x5 but the first image is 6x4"):
        list(iter_frames(tmp_path))


def test_frames_are_decoded_lazily_one_at_a_time():
    frames = iter_frames(SAMPLE)
    first = next(frames)
    assert first.shape == (96, 160, 3) and first.dtype == np.uint8
    frames.close()                                     # closing early must not decode the rest


def test_unsupported_output_suffix_is_refused_with_the_choices(tmp_path):
    with pytest.raises(VideoIOError, match=r"\.mp4.*\.webm"):
        VideoWriter(tmp_path / "x.avi", Fraction(24))


def test_missing_input_says_not_found(tmp_path):
    with pytest.raises(VideoIOError, match="input not found"):
        probe(tmp_path / "nope.mp4")


def test_writer_rejects_a_frame_of_another_size(tmp_path):
    with pytest.raises(ValueError, match="frame 1 is 8x8, earlier frames were 16x16"):
        with VideoWriter(tmp_path / "s.mp4", Fraction(24)) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            w.write(np.zeros((8, 8, 3), np.uint8))
    assert not any(tmp_path.iterdir())


def test_partial_name_is_hidden_and_keeps_the_suffix(tmp_path):
    p = video_io.partial_path(tmp_path / "clip.mkv")
    assert p.name.startswith(".clip.partial-") and p.suffix == ".mkv"
