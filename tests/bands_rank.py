"""One rank of a CPU (gloo) run of the projector and the decoders on row bands, as a script:
``python bands_rank.py JOB.json RANK``.

Every rank builds the same small random networks. Rank 0 runs each network alone (one process),
then over all ranks (``ParallelProjector`` / ``ParallelDecoder``) while the others answer its
messages (``BandWorker``), over several chunks, and writes both results to ``out/bands.pt``.
Job keys: ``init`` (file:// store), ``world``, ``nets`` (any of "projector", "tc", "vae"),
``latent`` (latent rows, cols: the frame is 8x that; the projector's token rows are half),
``chunks`` (latents per chunk).
"""
import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _register_package() -> None:
    spec = importlib.util.spec_from_file_location("flashvsr_tests_conftest", ROOT / "tests" / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def row_stable_kernels() -> None:
    """Convolutions, linear layers and SiLU whose rounding of a value does not depend on the
    call's size, for the bit-for-bit checks.

    torch's CPU kernels may round a pixel differently with another row count: oneDNN picks its
    convolution algorithm (and so its summation order) by shape (3x3, 32->16 channels on 16x48
    rows vs 8x48: up to 5e-5 apart), torch's own convolution hands its GEMM a size-dependent
    blocking, and SiLU rounds differently in its vector loop and in the scalar loop that finishes
    a tensor. Here every output value is a sum of products in one fixed order (input channel,
    then tap), each a separate elementwise multiply and add, and SiLU is exp, add and divide,
    which round alike on both loops. With these, the bands must give the one-process values bit
    for bit: any difference is an error of the split, not of rounding.
    """
    import itertools
    import torch
    import torch.nn.functional as F

    def ordered_sum(products, dim):
        # a scan adds along ``dim`` one term after the other for every position alike; its
        # last entry is the sum in index order
        return products.cumsum(dim).select(dim, -1)

    def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        nd = weight.dim() - 2
        stride, padding, dilation = ((v,) * nd if isinstance(v, int) else tuple(v) for v in (stride, padding, dilation))
        if groups != 1 or any(d != 1 for d in dilation):
            raise NotImplementedError("groups and dilation are not used by these networks")
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
        kernel = weight.shape[2:]
        sizes = [(x.shape[2 + i] - kernel[i]) // stride[i] + 1 for i in range(nd)]
        taps = [x[(slice(None), slice(None), *(slice(t, t + s * (n - 1) + 1, s) for t, s, n in zip(tap, stride, sizes)))]
                for tap in itertools.product(*map(range, kernel))]
        # (B, 1, C_in * taps, *out) times (1, C_out, C_in * taps, 1...): every product, in channel-then-tap order
        terms = torch.stack(taps, dim=2).flatten(1, 2).unsqueeze(1)
        out = ordered_sum(terms * weight.flatten(1).view(1, weight.shape[0], -1, *[1] * nd), 2)
        return out if bias is None else out + bias.view(1, -1, *[1] * nd)

    def linear(x, weight, bias=None):
        out = ordered_sum(x.unsqueeze(-2) * weight, -1)
        return out if bias is None else out + bias

    def silu(x, inplace=False):
        y = x / (1 + torch.exp(-x))
        return x.copy_(y) if inplace else y

    F.conv2d, F.conv3d, F.linear, F.silu = conv, conv, linear, silu


def networks(seed: int = 0):
    import torch
    from comfyui_flashvsr.flashvsr.engine.random_weights import make_random
    from comfyui_flashvsr.models.lq_projector import LQProjector, LQProjectorConfig
    from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderConfig
    from comfyui_flashvsr.models.wan_vae import WanVAEConfig, WanVAEDecoder
    gen = torch.Generator("cpu").manual_seed(seed)
    cpu, f32 = torch.device("cpu"), torch.float32
    return {
        "projector": make_random(lambda: LQProjector(LQProjectorConfig(hidden1=16, hidden2=16, out_dim=24), causal=True),
                                 cpu, f32, gen),
        "tc": make_random(lambda: TCDecoder(TCDecoderConfig(channels=(16, 8, 8, 8))), cpu, f32, gen),
        "vae": make_random(lambda: WanVAEDecoder(WanVAEConfig(base_dim=4, num_res_blocks=0)), cpu, f32, gen),
    }


def inputs(job: dict):
    """Per chunk: (projector clips, latents, cond): a random stream of ``chunks`` latents each."""
    import torch
    gen = torch.Generator().manual_seed(3)
    h, w = job["latent"]
    out = []
    for i, t in enumerate(job["chunks"]):
        frames = 4 * t - (3 if i == 0 else 0)
        clips = [torch.rand((1, 3, 1 if i == 0 and c == 0 else 4, 8 * h, 8 * w), generator=gen) for c in range(t)]
        out.append((clips, torch.randn((1, 16, t, h, w), generator=gen),
                    torch.rand((1, 3, frames, 8 * h, 8 * w), generator=gen) * 2 - 1))
    return out


def run(job: dict, projector, decoders: dict) -> dict:
    """Every network over every chunk; ``projector``/``decoders`` are the networks or their parallel forms."""
    import torch
    from comfyui_flashvsr.models.lq_projector import ProjectorState
    results = {}
    if "projector" in job["nets"]:
        state = ProjectorState()
        tokens = [projector.stream(clip, state) for clips, _, _ in inputs(job) for clip in clips]
        results["projector"] = torch.cat([t for t in tokens if t is not None], dim=1)
    for name, decoder in decoders.items():
        state = decoder.new_state()
        results[name] = torch.cat([decoder.decode(lat, cond, state) for _, lat, cond in inputs(job)], dim=2)
    return results


def main(job_path: str, rank: int) -> None:
    _register_package()
    import torch
    from comfyui_flashvsr.flashvsr.engine.decoders import FullDecoder, TinyDecoder
    from comfyui_flashvsr.flashvsr.engine.parallel import ParallelConfig, join
    from comfyui_flashvsr.flashvsr.engine.parallel_bands import BandWorker, ParallelDecoder, ParallelProjector
    from comfyui_flashvsr.models.tcdecoder import TCDecoderPasses
    torch.set_num_threads(1)
    job = json.loads(pathlib.Path(job_path).read_text())
    if job.get("row_stable"):
        row_stable_kernels()
    group = join(ParallelConfig(rank, job["world"], init_method=job["init"], timeout_s=60), "cpu")
    nets = networks()
    passes = TCDecoderPasses(latents=1, tail_frames=1)
    make = {"tc": lambda: TinyDecoder(nets["tc"], passes), "vae": lambda: FullDecoder(nets["vae"])}
    wanted = [n for n in ("tc", "vae") if n in job["nets"]]
    if rank != 0:
        for name in wanted or ["tc"]:
            worker = BandWorker(group, nets["projector"], nets[name])
            while (message := group.receive())[0] != "exit":
                worker.handle(message)
        group.close()
        return
    alone = run(job, nets["projector"], {n: make[n]() for n in wanted})
    together = {}
    for i, name in enumerate(wanted or ["tc"]):
        proj = ParallelProjector(nets["projector"], group)
        part = dict(job, nets=[n for n in job["nets"] if n == name or (n == "projector" and i == 0)])
        together |= run(part, proj, {name: ParallelDecoder(make[name](), group)} if wanted else {})
        group.release()
    group.close()
    torch.save({k: (alone[k], together[k]) for k in alone}, pathlib.Path(job["out"]) / "bands.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
