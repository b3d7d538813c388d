"""The DiT's block steps: the compiled fast path shares one graph per step and chunk shape across
all blocks (30 specialised graphs would exceed torch.compile's recompile limit and silently run
eagerly), and compiling changes no result."""
from __future__ import annotations

from dataclasses import fields

import torch

from comfyui_flashvsr.attention import AttentionDispatcher
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.models import dit_ops
from comfyui_flashvsr.models.dit import DiTStreamState, SparseParams


def _run_chunks(pipe, steps) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 16, 6, 32, 32, generator=g)] + [torch.randn(1, 16, 2, 32, 32, generator=g) for _ in range(2)]
    state, session = DiTStreamState(), AttentionDispatcher().session("disable")
    return [pipe.dit.forward_chunk(x, None, pipe.consts, state, SparseParams(2.0, 3, 11), session, steps) for x in chunks]


def test_compiled_block_steps_trace_one_graph_per_step_and_chunk_shape_for_every_block():
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="tiny")
    assert len(pipe.dit.blocks) >= 2          # a graph per block would show as more graphs
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward                      # run the traced graph as it is: same ops, same values

    torch._dynamo.reset()
    try:
        compiled = dit_ops.BlockSteps(**{
            f.name: torch.compile(getattr(dit_ops.FAST, f.name), backend=counting_backend, fullgraph=True, dynamic=False)
            for f in fields(dit_ops.BlockSteps)})
        got = _run_chunks(pipe, compiled)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 3 * 2               # three steps x (chunk 0's 6 frames, the steady 2 frames)
    want = _run_chunks(pipe, dit_ops.FAST)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_fast_steps_differ_from_the_eager_reference_only_by_float32_rope():
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="tiny")
    fast, eager = _run_chunks(pipe, dit_ops.FAST), _run_chunks(pipe, None)
    for a, b in zip(fast, eager):
        assert float((a - b).norm() / b.norm()) < 1e-5
