"""One rank of a CPU (gloo) parallel run, as a script: ``python parallel_rank.py JOB.json [RANK]``
(without RANK: torchrun's variables, as the ``--gpus`` launcher sets them).

The parallel tests start one of these per rank. Every rank builds the same small random networks
(6 heads of 128, so 2, 3 and 6 ranks split them); rank 0 upscales a clip once in this process alone
and once over all ranks, and writes both results to ``out/rank0.pt``. Job keys: ``init`` (file://
store, or env://), ``world``, ``modes``, ``frames``, ``size`` (input h, w), ``scale``, ``heads``,
``rank0_share`` (given to rank 0 only: the workers take it from rank 0), ``fail_rank`` (that rank raises at its first
collective of a chunk; with ``fail_at_start`` as soon as it joined),
``rank0_sleeps`` (rank 0 sleeps instead of working, as if stuck in a collective),
``expect_weights`` (the workers first wait for rank 0's "weights loaded" message, as when rank 0 is
the ``flashvsr upscale`` command).
"""
import importlib.util
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _register_package() -> None:
    spec = importlib.util.spec_from_file_location("flashvsr_tests_conftest", ROOT / "tests" / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def networks(mode: str, heads: int, seed: int = 0):
    """Same values on every rank; the DiT, projector and prompt are drawn before the decoder, so they
    do not depend on the mode."""
    import torch
    from comfyui_flashvsr.flashvsr.engine.random_weights import make_random
    from comfyui_flashvsr.models.dit import DiTConfig, WanDiT
    from comfyui_flashvsr.models.lq_projector import LQProjector, LQProjectorConfig
    from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderConfig
    dim = 128 * heads
    gen = torch.Generator("cpu").manual_seed(seed)
    cpu, f32 = torch.device("cpu"), torch.float32
    dit = make_random(lambda: WanDiT(DiTConfig(dim=dim, ffn_dim=256, text_dim=32, num_heads=heads, num_layers=2)),
                      cpu, f32, gen)
    projector = make_random(lambda: LQProjector(LQProjectorConfig(hidden1=16, hidden2=16, out_dim=dim), causal=True),
                            cpu, f32, gen)
    prompt = torch.randn((1, 8, 32), generator=gen).to(torch.bfloat16)
    if mode == "full":
        from comfyui_flashvsr.models.wan_vae import WanVAEConfig, WanVAEDecoder
        # the narrowest Wan VAE decoder: Full's decoding dominates a CPU run otherwise
        decoder = make_random(lambda: WanVAEDecoder(WanVAEConfig(base_dim=4, num_res_blocks=0)), cpu, f32, gen)
    else:
        decoder = make_random(lambda: TCDecoder(TCDecoderConfig(channels=(16, 8, 8, 8))), cpu, f32, gen)
    return dit, projector, decoder, prompt


def main(job_path: str, rank: int) -> None:
    _register_package()
    import torch
    from comfyui_flashvsr.flashvsr.config import UpscaleConfig
    from comfyui_flashvsr.flashvsr.engine.parallel import ParallelConfig, join
    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
    from comfyui_flashvsr.models.sequence_parallel import SequenceParallel
    from comfyui_flashvsr.models.row_bands import RowBands
    torch.set_num_threads(1)
    job = json.loads(pathlib.Path(job_path).read_text())
    group = join(ParallelConfig(rank, job["world"], init_method=job["init"], timeout_s=60,
                                rank0_share=job.get("rank0_share", 1.0) if rank == 0 else 1.0), "cpu")
    if rank == job.get("fail_rank") and job.get("fail_at_start"):
        raise RuntimeError(f"rank {rank} fails on purpose")
    if rank == 0 and job.get("rank0_sleeps"):
        pathlib.Path(job["out"], "rank0.pid").write_text(str(os.getpid()))
        time.sleep(600)
    if rank == job.get("fail_rank"):
        def fail(*args, **kwargs):
            raise RuntimeError(f"rank {rank} fails on purpose")
        SequenceParallel.scatter = fail     # the first collective of a chunk: the projector's
        RowBands.scatter = fail             # bands, or the DiT's windows

    def pipeline(mode, parallel):
        return FlashVSR(*networks(mode, job["heads"]), mode, "v1.1", "cpu", torch.float32, parallel=parallel)

    if rank != 0:
        if job.get("expect_weights"):        # rank 0 is the real command, which loads weight files
            group.expect("weights")
        for mode in job["modes"]:            # the decoder's bands need the mode's decoder
            pipeline(mode, group).serve()
        group.close()
        return
    h, w = job["size"]
    frames = torch.rand((job["frames"], h, w, 3), generator=torch.Generator().manual_seed(5))
    cfg = UpscaleConfig(scale=job["scale"])
    results = {}
    for i, mode in enumerate(job["modes"]):
        alone = pipeline(mode, None).upscale(frames, cfg).frames
        together = pipeline(mode, group).upscale(frames, cfg).frames
        results[mode] = (alone, together)
        if i + 1 < len(job["modes"]):
            group.release()                  # the workers load the next mode
    group.close()
    torch.save(results, pathlib.Path(job["out"]) / "rank0.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ["RANK"]))
