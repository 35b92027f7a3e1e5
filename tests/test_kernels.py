"""
GPU tests: each CUDA kernel in csrc/ against its PyTorch reference in ops.py, on fresh random inputs
(never zeros), with the outputs' memory poisoned beforehand. Skipped only where there is no CUDA
device; with one, a failed extension build fails every test here.
$ python -m pytest -q tests/test_kernels.py
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ops  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device: the kernels are CUDA-only')
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def extension_built():
    assert ops._ext is not None, 'CUDA is present but the csrc/ extension did not build (see the warning at import)'


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not out.isnan().any(), 'NaN in the output'
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned(fn, *args, sizes):
    """fn(*args) right after NaN-filled blocks of the output sizes (in bytes) went back to the caching
    allocator: an output element the kernel forgets to write then reads as NaN (or, as an int, as a
    huge index) instead of a stale right answer."""
    junk = [torch.full((n // 4 + 1,), float('nan'), device='cuda') for n in sizes]
    del junk
    return fn(*args)


def routing(T, k, E, case):
    if case == 'one_expert':  # every slot on the last expert
        return torch.full((T, k), E - 1, dtype=torch.int64, device='cuda')
    if case == 'empty_experts':  # top-k over the first half of the experts only
        return torch.rand(T, E // 2, device='cuda').topk(k, dim=1).indices
    return torch.rand(T, E, device='cuda').topk(k, dim=1).indices

# -----------------------------------------------------------------------------
# permute

PERMUTE_SHAPES = [  # T, D, k, E: T a multiple of no block size, odd row bytes, k = 1..8
    (1, 8, 1, 4), (37, 24, 3, 8), (1000, 7, 2, 4), (2048, 128, 6, 16), (3001, 200, 4, 12), (4099, 2048, 8, 64),
]


@pytest.mark.parametrize('T,D,k,E', PERMUTE_SHAPES)
@pytest.mark.parametrize('case', ['random', 'empty_experts', 'one_expert'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_permute(T, D, k, E, case, dtype):
    x = torch.randn(T, D, device='cuda', dtype=dtype)
    ids = routing(T, k, E, case)
    S, es = T * k, x.element_size()
    x_sorted, offsets, row_map = poisoned(ops.moe_permute, x, ids, E, sizes=[S * D * es, E * 4, S * 4])
    ref_sorted, ref_offsets, ref_row_map = ops.moe_permute_reference(x, ids, E)
    assert x_sorted.shape == (S, D) and offsets.dtype == row_map.dtype == torch.int32
    assert torch.equal(offsets, ref_offsets)
    assert torch.equal(row_map.sort().values, torch.arange(S, device='cuda', dtype=torch.int32))  # a permutation
    assert torch.equal(x_sorted[row_map.long()], x.repeat_interleave(k, dim=0))
    row_expert = torch.empty(S, dtype=torch.int64, device='cuda')
    row_expert[row_map.long()] = ids.reshape(-1)
    counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())
    assert torch.equal(row_expert, torch.arange(E, device='cuda').repeat_interleave(counts))
    # the kernel's sort is stable, like the reference's: same rows exactly (deterministic training)
    assert torch.equal(row_map, ref_row_map) and torch.equal(x_sorted, ref_sorted)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_permute_grad(dtype):
    T, D, k, E = 777, 64, 4, 16
    x = torch.randn(T, D, device='cuda', dtype=dtype, requires_grad=True)
    ids = routing(T, k, E, 'random')
    g = torch.randn(T * k, D, device='cuda', dtype=dtype)
    (grad,) = torch.autograd.grad(ops.moe_permute(x, ids, E)[0], x, g)
    (ref,) = torch.autograd.grad(ops.moe_permute_reference(x, ids, E)[0], x, g)
    assert rel_err(grad, ref) < TOL[dtype]

# -----------------------------------------------------------------------------
# unpermute and its backward

UNPERMUTE_SHAPES = [(1, 8, 1), (37, 24, 3), (1000, 7, 2), (2048, 128, 6), (3001, 200, 5), (4099, 2048, 8)]  # T, D, k


def unpermute_inputs(T, D, k, dtype, w_dtype=torch.float32):
    y_sorted = torch.randn(T * k, D, device='cuda', dtype=dtype)
    row_map = torch.randperm(T * k, device='cuda').to(torch.int32)
    weights = torch.rand(T, k, device='cuda', dtype=w_dtype) + 0.1
    return y_sorted, row_map, weights


@pytest.mark.parametrize('T,D,k', UNPERMUTE_SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_unpermute(T, D, k, dtype):
    y_sorted, row_map, weights = unpermute_inputs(T, D, k, dtype)
    y = poisoned(ops.moe_unpermute, y_sorted, row_map, weights, sizes=[T * D * y_sorted.element_size()])
    assert y.shape == (T, D) and y.dtype == dtype
    assert rel_err(y, ops.moe_unpermute_reference(y_sorted, row_map, weights)) < TOL[dtype]


def test_unpermute_bf16_weights():  # permute's backward passes unit weights in the gradient's dtype
    y_sorted, row_map, weights = unpermute_inputs(513, 96, 3, torch.bfloat16, torch.bfloat16)
    y = ops.moe_unpermute(y_sorted, row_map, weights)
    assert rel_err(y, ops.moe_unpermute_reference(y_sorted, row_map, weights)) < TOL[torch.bfloat16]


@pytest.mark.parametrize('T,D,k', UNPERMUTE_SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_unpermute_backward(T, D, k, dtype):
    y_sorted, row_map, weights = unpermute_inputs(T, D, k, dtype)
    grad_y = torch.randn(T, D, device='cuda', dtype=dtype)
    es = y_sorted.element_size()
    gys, gw = poisoned(ops._moe_unpermute_backward, grad_y, y_sorted, row_map, weights,
                       sizes=[T * k * D * es, T * k * 4])
    ref_gys, ref_gw = ops.moe_unpermute_backward_reference(grad_y, y_sorted, row_map, weights)
    assert gys.shape == y_sorted.shape and gw.shape == weights.shape and gw.dtype == weights.dtype
    assert rel_err(gys, ref_gys) < TOL[dtype]
    assert rel_err(gw, ref_gw) < TOL[dtype]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_unpermute_grad(dtype):
    y_sorted, row_map, weights = unpermute_inputs(999, 136, 6, dtype)
    y_sorted.requires_grad_(), weights.requires_grad_()
    g = torch.randn(999, 136, device='cuda', dtype=dtype)
    grads = torch.autograd.grad(ops.moe_unpermute(y_sorted, row_map, weights), (y_sorted, weights), g)
    refs = torch.autograd.grad(ops.moe_unpermute_reference(y_sorted, row_map, weights), (y_sorted, weights), g)
    for grad, ref in zip(grads, refs):
        assert rel_err(grad, ref) < TOL[dtype]

# -----------------------------------------------------------------------------
# latent decode

DECODE_SHAPES = [  # B, H, R, P, Tmax, lengths
    (1, 16, 512, 64, 8192, 'full'),
    (1, 128, 512, 64, 1000, 'full'),     # 32-head blocks from here
    (2, 32, 512, 64, 1000, 'ragged'),
    (3, 20, 128, 32, 300, 'ragged'),     # a 32-head block with 12 heads past H
    (2, 24, 96, 16, 130, 'ragged'),      # R % 64 != 0: 16-head blocks
    (32, 16, 512, 64, 2048, 'ragged'),
    (3, 4, 32, 16, 100, 'ragged'),       # the repo's small configs: heads padded to 16 on tensor cores
    (2, 8, 128, 32, 257, 'ragged'),
    (5, 6, 64, 16, 33, 'one'),           # every cache holds a single entry
    (4, 5, 48, 8, 300, 'ragged'),        # R % 32 != 0: the fallback kernel in every dtype
    (64, 2, 96, 16, 77, 'ragged'),       # large B
]


def decode_inputs(B, H, R, P, Tmax, lengths, dtype, nan_tail=False):
    q_latent = torch.randn(B, H, R, device='cuda', dtype=dtype)
    q_pe = torch.randn(B, H, P, device='cuda', dtype=dtype)
    # the caches are views into one [B, Tmax + 3, R + P] buffer, as a model may keep them
    buf = torch.randn(B, Tmax + 3, R + P, device='cuda', dtype=dtype)
    c_kv, k_pe = buf[:, :Tmax, :R], buf[:, :Tmax, R:]
    if lengths == 'full':
        lens = torch.full((B,), Tmax, dtype=torch.int32, device='cuda')
    elif lengths == 'one':
        lens = torch.ones(B, dtype=torch.int32, device='cuda')
    else:
        lens = torch.randint(1, Tmax + 1, (B,), dtype=torch.int32, device='cuda')
        lens[0] = 1
    if nan_tail:  # cache slots past a sequence's end may hold anything
        beyond = torch.arange(Tmax + 3, device='cuda') >= lens.view(-1, 1)
        buf[beyond] = float('nan')
    return q_latent, q_pe, c_kv, k_pe, lens, 1 / math.sqrt(R // 4 + P)


@pytest.mark.parametrize('B,H,R,P,Tmax,lengths', DECODE_SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_latent_decode(B, H, R, P, Tmax, lengths, dtype):
    args = decode_inputs(B, H, R, P, Tmax, lengths, dtype)
    out = poisoned(ops.latent_decode, *args, sizes=[B * H * R * args[0].element_size()])
    assert out.shape == (B, H, R) and out.dtype == dtype
    assert rel_err(out, ops.latent_decode_reference(*args)) < TOL[dtype]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_latent_decode_nan_tail(dtype):
    q_latent, q_pe, c_kv, k_pe, lens, scale = decode_inputs(6, 16, 512, 64, 300, 'ragged', dtype, nan_tail=True)
    out = ops.latent_decode(q_latent, q_pe, c_kv, k_pe, lens, scale)
    valid = (torch.arange(300, device='cuda') < lens.view(-1, 1)).unsqueeze(-1)
    ref = ops.latent_decode_reference(q_latent, q_pe, c_kv.where(valid, 0), k_pe.where(valid, 0), lens, scale)
    assert rel_err(out, ref) < TOL[dtype]

# -----------------------------------------------------------------------------
# the ops as torch sees them

def test_opcheck():
    x = torch.randn(300, 64, device='cuda', dtype=torch.bfloat16)
    ids = routing(300, 4, 8, 'random')
    x_sorted, _, row_map = ops.moe_permute(x, ids, 8)
    weights = torch.rand(300, 4, device='cuda')
    grad_y = torch.randn(300, 64, device='cuda', dtype=torch.bfloat16)
    decode = decode_inputs(3, 16, 128, 32, 100, 'ragged', torch.bfloat16)
    torch.library.opcheck(ops._moe_permute, (x, ids, 8))
    torch.library.opcheck(ops._moe_unpermute, (x_sorted, row_map, weights))
    torch.library.opcheck(ops._moe_unpermute_backward, (grad_y, x_sorted, row_map, weights))
    torch.library.opcheck(ops._latent_decode, decode)


def test_compile_fullgraph():
    """permute -> matmul -> unpermute with backward compiles to one graph (fullgraph=True raises on a
    break) and matches eager."""
    T, D, k, E = 512, 64, 2, 8
    x = torch.randn(T, D, device='cuda', requires_grad=True)
    w = torch.randn(D, D, device='cuda', requires_grad=True)
    ids = routing(T, k, E, 'random')
    gates = torch.rand(T, k, device='cuda', requires_grad=True)

    def moe(x, w, gates):
        x_sorted, offsets, row_map = ops.moe_permute(x, ids, E)
        return ops.moe_unpermute(x_sorted @ w, row_map, gates)

    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True)
    grads = torch.autograd.grad(compiled(x, w, gates).square().sum(), (x, w, gates))
    refs = torch.autograd.grad(moe(x, w, gates).square().sum(), (x, w, gates))
    for grad, ref in zip(grads, refs):
        assert rel_err(grad, ref) < 1e-5
