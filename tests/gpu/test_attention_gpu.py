"""GPU checks of the attention backends at FlashVSR's steady-state shapes (768x1408 output:
8448 query tokens, 33792 keys, 12 heads, head_dim 128, bf16). Skipped without CUDA.

Thresholds: sage vs fp32 cos >= 0.999 and relative L2 <= 0.03 (issue #3; docs/model.md §14; measured
0.0135 for 1.0.6 on H100); exact block-sparse algorithms in bf16 relative L2 <= 1e-2 (bf16 SDPA vs
fp32 is 0.0023 on H100).
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from comfyui_flashvsr.attention import AttentionConfig, AttentionDispatcher  # noqa: E402
from comfyui_flashvsr.attention.block_sparse import BLOCK, CompiledFlex, build_lut, masked_reference  # noqa: E402
from comfyui_flashvsr.attention.fa4 import fa4_block_sparse, probe_fa4  # noqa: E402
from comfyui_flashvsr.attention.gathered import gathered_attention, paged_attention, paged_refusal  # noqa: E402
from comfyui_flashvsr.attention.probe import probe_sage  # noqa: E402
# The Triton backends' own tests: FA4, where installed, would otherwise take the dispatcher's calls.
NO_FA4 = AttentionConfig(sparse_backends=("triton", "flex", "paged", "gather-varlen", "gather", "reference"))

HEADS, DIM, LQ, LK, CROSS = 12, 128, 8448, 33792, 512


def rel_l2(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def cosine(out, ref):
    return float(F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))


def tensors(lq, lk, seed, layout="bhld"):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(n):
        if layout == "bhld":
            return torch.randn(1, HEADS, n, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        return torch.randn(1, n, HEADS, DIM, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)

    return make(lq), make(lk), make(lk)


def sparse_mask(seed, density=0.45):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(1, HEADS, LQ // BLOCK, LK // BLOCK, device="cuda", generator=g) < density
    mask[:, :, 5] = False              # an empty query block in every head
    mask[:, 3] = False                 # a head that selects nothing at all
    return mask


@pytest.fixture(scope="module")
def sparse_case():
    q, k, v = tensors(LQ, LK, 0)
    mask = sparse_mask(1)
    ref = masked_reference(q.float(), k.float(), v.float(), mask)
    return q, k, v, mask, ref


def assert_zero_where_empty(out, mask):
    assert torch.equal(out[:, :, 5 * BLOCK:6 * BLOCK], torch.zeros_like(out[:, :, 5 * BLOCK:6 * BLOCK]))
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))


def sage_or_skip():
    probe = probe_sage()
    if not probe.available:
        pytest.skip(probe.reason)
    return probe


@pytest.mark.parametrize("lq, lk", [(LQ, CROSS), (4096, 4096)])
def test_sage_matches_fp32_attention_on_random_bf16(lq, lk):
    sage_or_skip()
    q, k, v = tensors(lq, lk, 2)
    session = AttentionDispatcher(AttentionConfig(dense_sage_where_slower=True)).session("enable")
    out = session.dense(q, k, v)
    summary = session.summary()
    assert summary.startswith("attention: sage (dense)")
    slower = session.dispatcher.sage_slower_than_sdpa()
    # SageAttention 1.x on Hopper is slower than SDPA: when it runs anyway the summary says so
    assert (slower is not None) == ("slower" in summary)
    if probe_sage().flavour == "1.x" and torch.cuda.get_device_capability()[0] == 9:
        assert slower is not None
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert cosine(out, ref) >= 0.999 and rel_l2(out, ref) <= 0.03


def test_enable_by_default_never_runs_a_sage_that_is_slower_here():
    probe = sage_or_skip()
    q, k, v = tensors(LQ, CROSS, 2)
    session = AttentionDispatcher().session("enable")
    session.dense(q, k, v)
    if probe.flavour == "1.x" and torch.cuda.get_device_capability()[0] == 9:
        assert session.summary().startswith("attention: sdpa (dense)")
        assert "slower than SDPA on Hopper" in session.summary()
    else:
        assert session.summary().startswith("attention: sage (dense)")


def test_sage_leaves_cached_keys_unchanged():
    probe = sage_or_skip()
    q, k, v = tensors(LQ, CROSS, 3)
    k_before, v_before = k.clone(), v.clone()
    AttentionDispatcher().session("enable").dense(q, k, v)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    if probe.flavour == "1.x":                       # the bug the clone protects against is real
        raw = k.clone()
        probe.fn(q, raw, v, tensor_layout="HND")
        assert not torch.equal(raw, k)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_triton_kernel_matches_masked_reference_in_bf16(sparse_case, layout):
    from comfyui_flashvsr.attention import triton_kernels as tk

    q, k, v, mask, ref = sparse_case
    if layout == "blhd":                              # same values, (B, L, H, D) storage
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    lut, counts = build_lut(mask)
    cc = torch.cuda.get_device_capability()
    for config in {tk.default_config(cc), tk.KernelConfig(128, 8, 2), tk.KernelConfig(64, 8, 2, tma=True)}:
        out = tk.block_sparse_attention(q, k, v, lut, counts, config)
        assert rel_l2(out, ref) <= 1e-2, config
        assert_zero_where_empty(out, mask)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_int8_kernel_meets_the_sage_accuracy_thresholds(sparse_case, layout):
    from comfyui_flashvsr.attention import triton_kernels as tk

    q, k, v, mask, ref = sparse_case
    if layout == "blhd":                              # the DiT's KV ring: (B, L, H, D) storage
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    k_before = k.clone()
    lut, counts = build_lut(mask)
    cc = torch.cuda.get_device_capability()
    for config in {tk.default_config(cc, int8=True), tk.KernelConfig(128, 8, 2), tk.KernelConfig(64, 4, 2, tma=True)}:
        out = tk.block_sparse_attention_int8(q, k, v, lut, counts, config)
        assert torch.equal(k, k_before)
        assert cosine(out, ref) >= 0.999 and rel_l2(out, ref) <= 0.03, config
        assert_zero_where_empty(out, mask)
        assert out.stride() == q.stride()
    # a caller's estimate of the key mean changes nothing beyond quantisation noise
    hinted = tk.block_sparse_attention_int8(q, k, v, lut, counts, tk.default_config(cc, int8=True),
                                            key_mean=k.float().mean(dim=2) + 0.1)
    assert cosine(hinted, ref) >= 0.999 and rel_l2(hinted, ref) <= 0.03


def test_dispatcher_enable_on_hopper_runs_the_int8_kernel_and_says_so(sparse_case):
    q, k, v, mask, ref = sparse_case
    session = AttentionDispatcher(NO_FA4).session("enable")
    out = session.block_sparse(q, k, v, mask, key_mean=k.float().mean(dim=2))
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert session.summary().startswith("attention: triton-int8 (sparse)" if hopper else "attention: triton (sparse)")
    assert cosine(out, ref) >= 0.999 and rel_l2(out, ref) <= 0.03
    assert_zero_where_empty(out, mask)


def test_compiled_flex_matches_reference_and_does_not_recompile_for_new_masks(sparse_case):
    import torch._dynamo

    q, k, v, mask, ref = sparse_case
    flex = CompiledFlex()
    out = flex(q, k, v, *build_lut(mask))
    assert rel_l2(out, ref) <= 1e-2
    assert_zero_where_empty(out, mask)
    other = sparse_mask(7, density=0.3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out2 = flex(q, k, v, *build_lut(other))
    assert rel_l2(out2, masked_reference(q, k, v, other)) <= 1e-2


def test_dispatcher_on_cuda_runs_our_triton_kernel_and_reports_it(sparse_case):
    q, k, v, mask, ref = sparse_case
    session = AttentionDispatcher(NO_FA4).session("disable")
    out = session.block_sparse(q, k, v, mask)
    assert rel_l2(out, ref) <= 1e-2
    assert session.summary() == "attention: triton (sparse)"
    report = session.report()["calls"]["block_sparse/triton"]
    assert report["calls"] == 1 and report["seconds"] > 0


def test_int8_kernel_takes_keys_quantised_in_a_ring_layout(sparse_case):
    from comfyui_flashvsr.attention import triton_kernels as tk
    from comfyui_flashvsr.attention.block_sparse import QuantizedKeys

    q, k, v, mask, ref = sparse_case
    # (L, H, D) storage like the DiT's KV ring; one shift for all keys, as the ring keeps it
    ring = torch.zeros(1, LK, HEADS, DIM, dtype=torch.int8, device="cuda").transpose(1, 2)
    scales = torch.zeros(1, HEADS, LK // 64, device="cuda")
    shift = k[:, :, :8448].float().mean(dim=2)
    tk.quantize_tiles(k, 64, 1.0, shift, out=(ring, scales))
    keys = QuantizedKeys(ring, scales, 64, k.dtype, shift=shift)
    lut, counts = build_lut(mask)
    out = tk.block_sparse_attention_int8(q, keys, v, lut, counts, tk.default_config(torch.cuda.get_device_capability(), int8=True))
    assert cosine(out, ref) >= 0.999 and rel_l2(out, ref) <= 0.03
    assert_zero_where_empty(out, mask)
    assert rel_l2(keys.dequantize(), k) <= 0.01
    session = AttentionDispatcher(NO_FA4).session("enable")
    via = session.block_sparse(q, keys, v, mask)
    assert cosine(via, ref) >= 0.999 and rel_l2(via, ref) <= 0.03
    plain = AttentionDispatcher().session("disable")          # a bf16 backend dequantises the keys
    assert rel_l2(plain.block_sparse(q, keys, v, mask), ref) <= 0.03


@pytest.mark.parametrize("keys", ["fp", "int8"])
def test_int8_kernel_with_int8_values_meets_the_sage_accuracy_thresholds(sparse_case, keys):
    """kv_int8_values (issue #14 item 3): the KV ring's values in int8, per (64 keys, head, channel),
    read by the INT8 kernel at the real shapes; keys as the caller's bf16 or as the ring's int8."""
    from comfyui_flashvsr.attention import triton_kernels as tk
    from comfyui_flashvsr.attention.block_sparse import QuantizedKeys, QuantizedValues

    q, k, v, mask, ref = sparse_case
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))    # the ring's layout
    config = tk.default_config(torch.cuda.get_device_capability(), int8=True)
    rows = config.block_n
    v8 = torch.zeros(1, LK, HEADS, DIM, dtype=torch.int8, device="cuda").transpose(1, 2)
    v_scales = torch.zeros(1, HEADS, LK // rows, DIM, device="cuda")
    tk.quantize_value_tiles(v, rows, out=(v8, v_scales))
    values = QuantizedValues(v8, v_scales, rows, v.dtype)
    assert rel_l2(values.dequantize(), v) <= 0.01
    if keys == "int8":
        k8 = torch.zeros(1, LK, HEADS, DIM, dtype=torch.int8, device="cuda").transpose(1, 2)
        k_scales = torch.zeros(1, HEADS, LK // rows, device="cuda")
        shift = k[:, :, :8448].float().mean(dim=2)
        tk.quantize_tiles(k, rows, 1.0, shift, out=(k8, k_scales))
        k = QuantizedKeys(k8, k_scales, rows, k.dtype, shift=shift)
    lut, counts = build_lut(mask)
    out = tk.block_sparse_attention_int8(q, k, values, lut, counts, config)
    plain_v = tk.block_sparse_attention_int8(q, k, v, lut, counts, config)
    # printed for docs/performance.md ("Int8 values": numbers owed); run with -s to see them
    print(f"int8 values, {keys} keys: relL2 {rel_l2(out, ref):.4f} cos {cosine(out, ref):.6f}; "
          f"bf16 values: relL2 {rel_l2(plain_v, ref):.4f} cos {cosine(plain_v, ref):.6f}")
    assert cosine(out, ref) >= 0.999 and rel_l2(out, ref) <= 0.03
    assert rel_l2(out, ref) <= rel_l2(plain_v, ref) + 0.005
    assert_zero_where_empty(out, mask)
    session = AttentionDispatcher(NO_FA4).session("enable", int8_values=True)
    via = session.block_sparse(q, k, values, mask)
    assert cosine(via, ref) >= 0.999 and rel_l2(via, ref) <= 0.03
    plain = AttentionDispatcher().session("disable")          # a bf16 backend dequantises the values
    assert rel_l2(plain.block_sparse(q, k, values, mask), ref) <= 0.03


def uneven_mask(seed):
    """Counts from ~10 % to ~80 % of the key blocks across heads, plus the empty rows of sparse_mask."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    density = torch.linspace(0.1, 0.8, HEADS, device="cuda")[None, :, None, None]
    mask = torch.rand(1, HEADS, LQ // BLOCK, LK // BLOCK, device="cuda", generator=g) < density
    mask[:, :, 5] = False
    mask[:, 3] = False
    return mask


def ring_layout(q, k, v, mask):
    """The DiT's layout: (B, L, H, D) storage seen as (B, H, L, D) views, and a ring slot (66 key
    blocks) that no query selects, as a free slot of the KV ring."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    mask = mask.clone()
    mask[..., 66:132] = False
    return q, k, v, mask


def fa4_or_skip():
    probe = probe_fa4()
    if not probe.available:
        pytest.skip(probe.reason)
    if torch.cuda.get_device_capability()[0] not in (9, 10, 11):
        pytest.skip("FA4 block sparsity needs sm90/sm100/sm110")
    return probe


@pytest.mark.parametrize("layout", ["plain", "ring"])
@pytest.mark.parametrize("masks", ["random", "uneven"])
def test_fa4_matches_the_reference_with_empty_rows_uneven_counts_and_ring_layout(sparse_case, layout, masks):
    probe = fa4_or_skip()
    q, k, v, mask, ref = sparse_case
    if masks == "uneven":
        mask = uneven_mask(11)
        ref = masked_reference(q.float(), k.float(), v.float(), mask)
    if layout == "ring":
        q, k, v, mask = ring_layout(q, k, v, mask)
        ref = masked_reference(q.float(), k.float(), v.float(), mask)
    k_ptr = k.data_ptr()
    out = fa4_block_sparse(probe, q, k, v, *build_lut(mask))
    assert rel_l2(out, ref) <= 1e-2
    assert_zero_where_empty(out, mask)
    assert k.data_ptr() == k_ptr and out.shape == q.shape


def test_dispatcher_runs_fa4_first_for_both_modes_and_keeps_no_int8_key_cache(sparse_case):
    fa4_or_skip()
    q, k, v, mask, ref = sparse_case
    dispatcher = AttentionDispatcher()
    for mode in ("disable", "enable"):
        session = dispatcher.session(mode)
        out = session.block_sparse(q, k, v, mask)
        assert session.summary().endswith("fa4 (sparse)"), session.summary()
        assert rel_l2(out, ref) <= 1e-2
        assert session.key_rows(k) is None           # the ring keeps bf16 keys for FA4


def test_fa4_failure_falls_back_to_the_next_backend_and_is_cached(sparse_case, monkeypatch):
    import dataclasses

    probe = fa4_or_skip()
    q, k, v, mask, ref = sparse_case
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated FA4 failure")

    dispatcher = AttentionDispatcher(fa4=dataclasses.replace(probe, fn=broken))
    session = dispatcher.session("disable")
    for _ in range(2):
        out = session.block_sparse(q, k, v, mask)
        assert rel_l2(out, ref) <= 1e-2
    assert len(calls) == 1 and "fa4" not in session.summary()
    assert not dispatcher.fa4_serves(q.device)


@pytest.mark.parametrize("method", ["paged", "varlen", "padded"])
@pytest.mark.parametrize("layout", ["plain", "ring"])
def test_gathered_path_matches_the_reference_on_cuda(sparse_case, method, layout):
    q, k, v, _, _ = sparse_case
    mask = uneven_mask(12)
    if layout == "ring":
        q, k, v, mask = ring_layout(q, k, v, mask)
    ref = masked_reference(q.float(), k.float(), v.float(), mask)
    if method == "paged":
        why = paged_refusal(q)
        if why is not None:     # a torch without paged varlen: refused with its reason, so never run
            assert "block_table" in why
            return
        out = paged_attention(q, k, v, *build_lut(mask))
    else:
        out = gathered_attention(q, k, v, *build_lut(mask), method=method)
    assert rel_l2(out, ref) <= 1e-2
    assert_zero_where_empty(out, mask)
