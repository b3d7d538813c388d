"""``flashvsr bench``: every mode x sageattention case measured, labelled as random-weight numbers."""
import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest

from comfyui_flashvsr.flashvsr.cli import bench
from comfyui_flashvsr.flashvsr.cli import main as cli


class FakePipe:
    def __init__(self, mode, steady=()):
        self.mode, self.calls, self.steady = mode, [], list(steady)

    def upscale(self, frames, cfg):
        self.calls.append((frames.shape[0], cfg.sageattention))
        out = frames.repeat_interleave(int(cfg.scale), 1).repeat_interleave(int(cfg.scale), 2)
        steady = self.steady.pop(0) if self.steady else None
        return SimpleNamespace(frames=out, stats=SimpleNamespace(attention=f"fake-{cfg.sageattention}",
                                                                 steady_fps=steady))


def _params(**kw):
    base = dict(modes=("tiny", "full"), sage=("enable", "disable"), out_h=64, out_w=64, scale=2.0,
                frames=5, widths="tiny", version="v1.1", device="cpu", precision="fp32",
                warmup_frames=2, repeat=3)
    base.update(kw)
    return bench.BenchParams(**base)


def test_every_mode_and_sage_setting_is_measured_after_a_warmup():
    built = {}

    def build(mode):
        built[mode] = FakePipe(mode)
        return built[mode]

    results = bench.run(_params(), build)
    assert [(r.mode, r.sageattention) for r in results] == [
        ("tiny", "enable"), ("tiny", "disable"), ("full", "enable"), ("full", "disable")]
    # one warm-up (2 frames) then 3 measured runs (5 frames) per setting
    assert built["tiny"].calls == ([(2, "enable")] + [(5, "enable")] * 3
                                   + [(2, "disable")] + [(5, "disable")] * 3)
    assert all(r.frames == 5 and r.fps > 0 and r.attention == f"fake-{r.sageattention}" for r in results)


def test_table_and_json_carry_the_random_weights_label():
    params = _params(modes=("tiny",), sage=("disable",))
    data = bench.report(params, bench.run(params, FakePipe), bench.environment("cpu"))
    text, md = bench.table(data), bench.table(data, markdown=True)
    for out in (text, md):
        assert bench.LABEL_RANDOM in out and bench.LABEL_TINY in out
        assert "fake-disable" in out
    assert md.count("\n| tiny | disable |") == 1
    assert json.loads(json.dumps(data))["labels"] == [bench.LABEL_RANDOM, bench.LABEL_TINY]


def test_steady_fps_is_the_median_of_the_measured_runs_and_shown():
    # the warm-up run's steady rate (1.0) must not count; the measured runs give 50, 70, 60
    pipe = FakePipe("tiny", steady=[1.0, 50.0, 70.0, 60.0])
    params = _params(modes=("tiny",), sage=("disable",))
    (result,) = bench.run(params, lambda mode: pipe)
    assert result.steady_fps == 60.0
    md = bench.table(bench.report(params, [result], bench.environment("cpu")), markdown=True)
    assert "| e2e fps | e2e range | steady fps |" in md and "| 60.00 |" in md
    (unknown,) = bench.run(params, FakePipe)      # no CUDA events: shown as n/a, not as a number
    assert unknown.steady_fps is None
    assert "| n/a |" in bench.table(bench.report(params, [unknown], bench.environment("cpu")), markdown=True)


def test_full_width_runs_are_not_labelled_as_reduced():
    assert bench.labels(_params(widths="full")) == [bench.LABEL_RANDOM]


def test_bench_command_runs_the_real_reduced_networks_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--widths", "tiny", "--size", "128x128", "--frames", "21",
                     "--warmup-frames", "0", "--modes", "tiny", "--sage", "disable",
                     "--device", "cpu", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["frames"] == 21 and result["fps"] > 0 and result["peak_vram_bytes"] is None
    assert result["attention"] and data["params"]["precision"] == "fp32"
    assert bench.LABEL_TINY in capsys.readouterr().out


def test_bench_runs_tiled_and_says_so(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--widths", "tiny", "--size", "256x384", "--scale", "2", "--frames", "5",
                     "--warmup-frames", "0", "--modes", "tiny", "--sage", "disable", "--device", "cpu",
                     "--tile-size", "256", "--tile-overlap", "64", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["params"]["tile_size"] == 256 and data["results"][0]["frames"] == 5
    assert "tiles 256 px (overlap 64)" in capsys.readouterr().out


def test_peak_ram_includes_a_short_lived_allocation():
    before = int(open("/proc/self/statm").read().split()[1]) * 4096
    with bench.PeakRSS() as ram:
        block = np.ones(200 * 2**20, np.uint8)
        del block
    assert ram.peak_bytes - before >= 150 * 2**20


def test_size_and_list_arguments_are_validated():
    assert bench.pixels("768x1408") == (768, 1408)
    with pytest.raises(argparse.ArgumentTypeError, match="768x1408"):
        bench.pixels("768 by 1408")
    with pytest.raises(argparse.ArgumentTypeError, match="tiny, tiny-long, full"):
        bench.csv_choices(("tiny", "tiny-long", "full"))("tiny,huge")


def test_cuda_takes_three_measured_runs_by_default_and_cpu_one(monkeypatch, capsys):
    from comfyui_flashvsr.flashvsr.cli import common
    seen = []
    monkeypatch.setattr(bench, "run", lambda params: seen.append(params) or [])
    for device, expected in (("cuda", 3), ("cpu", 1)):
        monkeypatch.setattr(common, "resolve_device", lambda name, device=device: device)
        assert cli.main(["bench", "--precision", "fp32", "--modes", "tiny"]) == 0
        assert seen[-1].repeat == expected
    assert cli.main(["bench", "--precision", "fp32", "--repeat", "5"]) == 0 and seen[-1].repeat == 5
    assert "median of 5 run(s)" in capsys.readouterr().out
    assert cli.main(["bench", "--repeat", "0"]) == 2


def test_table_shows_the_median_and_the_range_of_the_runs():
    # the measured runs give steady 50, 70, 60 (the warm-up's 1.0 does not count)
    pipe = FakePipe("tiny", steady=[1.0, 50.0, 70.0, 60.0])
    params = _params(modes=("tiny",), sage=("disable",))
    (result,) = bench.run(params, lambda mode: pipe)
    assert result.runs == 3 and result.steady_fps_range == (50.0, 70.0)
    lo, hi = result.fps_range
    assert lo <= result.fps <= hi
    data = json.loads(json.dumps(bench.report(params, [result], bench.environment("cpu"))))
    md = bench.table(data, markdown=True)
    assert "| e2e fps | e2e range | steady fps | steady range |" in md
    assert f"| {result.fps:.2f} | {lo:.2f}-{hi:.2f} | 60.00 | 50.00-70.00 |" in md
    (single,) = bench.run(_params(modes=("tiny",), sage=("disable",), repeat=1), FakePipe)
    assert "| - | n/a | - |" in bench.table(bench.report(params, [single], bench.environment("cpu")),
                                            markdown=True)


def test_vram_budget_reaches_the_config_and_the_table_shows_predicted_next_to_measured():
    class Planned(FakePipe):
        def upscale(self, frames, cfg):
            self.budget = cfg.vram_budget
            result = super().upscale(frames, cfg)
            result.stats.predicted_peak_bytes = 6 * 2**30
            result.stats.plan = "3 640x768 tiles (overlap 128), predicted peak 6.0 GiB of a 8.0 GiB budget"
            return result

    pipes = []
    params = _params(modes=("tiny",), sage=("enable",), vram_budget=8.0)
    data = bench.report(params, bench.run(params, lambda mode: pipes.append(Planned(mode)) or pipes[-1]),
                        bench.environment("cpu"))
    assert pipes[0].budget == 8.0
    text = bench.table(data)
    assert "predicted VRAM" in text and "6.00 GiB" in text and "3 640x768 tiles (overlap 128)" in text
    assert "VRAM budget 8 GiB" in text


@pytest.mark.parametrize("value", ["auto", "0", "lots"])
def test_bench_vram_budget_takes_a_positive_number_of_gib(value, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--vram-budget", value])
    assert "--vram-budget" in capsys.readouterr().err


def test_inject_oom_makes_every_measured_run_replan_and_the_table_says_so(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--widths", "tiny", "--size", "512x768", "--scale", "4", "--frames", "9",
                     "--warmup-frames", "0", "--repeat", "2", "--modes", "tiny", "--sage", "disable",
                     "--device", "cpu", "--inject-oom", "1", "--markdown", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["frames"] == 9 and result["replans"] == 1 and data["params"]["inject_oom"] == 1
    assert result["plan"].split(", predicted")[0] != "untiled"          # the smaller plan it re-planned to
    text = capsys.readouterr().out
    assert "(re-planned after 1 out-of-memory error)" in text
    assert "an out-of-memory error injected after chunk 1 of every measured run" in text


def test_oom_at_raises_once_at_its_chunk():
    import torch
    hook = bench.oom_at(2)
    hook(1, 5)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected by bench --inject-oom 2"):
        hook(2, 5)
    hook(3, 5)                       # once only: the re-planned run goes on
    assert bench.oom_at(0) is None


def test_table_shows_the_reserved_peak_and_the_cuda_allocator_settings():
    params = _params(modes=("tiny",), sage=("enable",))
    result = bench.BenchResult("tiny", "enable", 41, 10.0, 4.1, 9 * 2**30, 2**30, "triton-int8",
                               peak_reserved_bytes=11 * 2**30)
    env = dict(bench.environment("cpu"), gpu="NVIDIA H100 80GB HBM3", allocator="expandable_segments:True")
    text = bench.table(bench.report(params, [result], env), markdown=True)
    assert "| peak VRAM | predicted VRAM | peak reserved |" in text and "| 11.00 GiB |" in text
    assert "NVIDIA H100 80GB HBM3" in text and "CUDA allocator expandable_segments:True" in text
