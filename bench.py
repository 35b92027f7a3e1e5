"""
Times the CUDA kernels in csrc/ against their PyTorch references in ops.py, next to the two ceilings
measured first on this GPU: device-to-device copy bandwidth and bf16 matmul throughput. Each row gives
the median ms per call, the achieved rates, the floor's share of the time (floor = the larger of
bytes / copy bandwidth and FLOPs / matmul rate: 100% is as fast as it can go) and the speedup.
$ python bench.py [--quick] [--out PATH]
"""
import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import model
import ops
from benchmarks.timing import markdown_table
from prepare import write_text

parser = argparse.ArgumentParser()
parser.add_argument('--quick', action='store_true', help='fewer repeats, smaller MoE layer')
parser.add_argument('--out', default=None, help='also write the markdown table to this file')
args = parser.parse_args()
assert torch.cuda.is_available() and ops._ext is not None, 'needs a CUDA GPU and the built csrc/ extension'
torch.manual_seed(1337)
REPS = 5 if args.quick else 20
bf16 = torch.bfloat16


def bench(make, graph=True, sets=1):
    """Median ms per call. make(i) returns a no-argument function on input set i; calls cycle through
    the sets so that repeated calls do not all hit in L2. With graph=True, calls under 0.2 ms are
    replayed from a CUDA graph, which keeps host-side launch overhead out of their times."""
    fns = [make(i) for i in range(sets)]
    for fn in fns:  # warm-up: first-call costs, allocator
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fns[0]()
    end.record()
    end.synchronize()
    estimate = start.elapsed_time(end)
    n = max(sets, min(64, int(2.0 / max(estimate, 1e-3))))  # ~2 ms per sample
    calls = [fns[i % sets] for i in range(n)]

    def run():
        for fn in calls:
            fn()
    if graph and estimate < 0.2:
        g, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            run()
        run = g.replay
    times = []
    for _ in range(REPS):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)

# -----------------------------------------------------------------------------
# the two ceilings

a = torch.randint(0, 255, (2**30,), dtype=torch.uint8, device='cuda')
b = torch.empty_like(a)
COPY_GBS = 2 * a.numel() / bench(lambda i: lambda: b.copy_(a), graph=False) / 1e6
del a, b
A, B_ = torch.randn(8192, 8192, dtype=bf16, device='cuda'), torch.randn(8192, 8192, dtype=bf16, device='cuda')
MM_TFLOPS = 2 * 8192**3 / bench(lambda i: lambda: A @ B_, graph=False) / 1e9
del A, B_
print(f"{torch.cuda.get_device_name()}: copy {COPY_GBS:.0f} GB/s (read + write), bf16 matmul {MM_TFLOPS:.0f} TFLOP/s")

rows = []


def report(name, shape, ms, ref_ms=None, nbytes=0, flops=0):
    floor = max(nbytes / COPY_GBS / 1e6, flops / MM_TFLOPS / 1e9)
    row = (name, shape, f"{ms:.4f}", f"{ref_ms:.4f}" if ref_ms else "", f"{ref_ms / ms:.1f}x" if ref_ms else "",
           f"{nbytes / ms / 1e6:.0f}" if nbytes else "", f"{flops / ms / 1e9:.1f}" if flops else "",
           f"{100 * floor / ms:.0f}%")
    rows.append(row)
    print(' | '.join(row), flush=True)

# -----------------------------------------------------------------------------
# MoE routing kernels: bytes = each input read once + each output written once (ids, maps, weights included)

def routing(T, k, E):
    return torch.rand(T, E, device='cuda').topk(k, dim=1).indices


for T, D, k, E in [(32768, 2048, 8, 64), (2048, 128, 2, 8), (2048, 128, 6, 16)]:
    shape = f"T={T} D={D} k={k} E={E}"
    x, ids = torch.randn(T, D, dtype=bf16, device='cuda'), routing(T, k, E)
    small = T * k * 8 + T * k * 4 + E * 4
    nbytes = (T + T * k) * D * 2 + small
    ms = bench(lambda i: lambda: ops.moe_permute(x, ids, E))
    ref = bench(lambda i: lambda: ops.moe_permute_reference(x, ids, E))
    report('moe_permute', shape, ms, ref, nbytes)

    y_sorted, _, row_map = ops.moe_permute(x, ids, E)
    weights = torch.rand(T, k, device='cuda')
    ms = bench(lambda i: lambda: ops.moe_unpermute(y_sorted, row_map, weights))
    ref = bench(lambda i: lambda: ops.moe_unpermute_reference(y_sorted, row_map, weights))
    report('moe_unpermute', shape, ms, ref, nbytes + T * k * 4)

    grad_y = torch.randn(T, D, dtype=bf16, device='cuda')
    ms = bench(lambda i: lambda: ops._moe_unpermute_backward(grad_y, y_sorted, row_map, weights))
    ref = bench(lambda i: lambda: ops.moe_unpermute_backward_reference(grad_y, y_sorted, row_map, weights))
    report('moe_unpermute_backward', shape, ms, ref, (T + 2 * T * k) * D * 2 + T * k * 16)
    del x, y_sorted, grad_y

# -----------------------------------------------------------------------------
# one MoE layer forward + backward (SwiGLU experts through grouped_mm) vs a dense SwiGLU MLP of the
# same active FLOPs, and the same MoE layer with the reference routing

grouped_mm = getattr(F, 'grouped_mm', None) or torch._grouped_mm
T, D, FF, E, k = (4096 if args.quick else 16384), 2048, 1408, 64, 8
x = torch.randn(T, D, dtype=bf16, device='cuda', requires_grad=True)
top = torch.randn(T, E, device='cuda').topk(k, dim=1)
ids, gates = top.indices, top.values.softmax(-1).requires_grad_()
w1, w3 = [(torch.randn(E, D, FF, device='cuda') * D**-0.5).to(bf16).requires_grad_() for _ in range(2)]
w2 = (torch.randn(E, FF, D, device='cuda') * FF**-0.5).to(bf16).requires_grad_()
W1, W3 = [(torch.randn(D, k * FF, device='cuda') * D**-0.5).to(bf16).requires_grad_() for _ in range(2)]
W2 = (torch.randn(k * FF, D, device='cuda') * (k * FF)**-0.5).to(bf16).requires_grad_()
grad_y = torch.randn(T, D, dtype=bf16, device='cuda')


def moe_step(permute, unpermute):
    def step():
        x_sorted, offsets, row_map = permute(x, ids, E)
        h = F.silu(grouped_mm(x_sorted, w1, offs=offsets)) * grouped_mm(x_sorted, w3, offs=offsets)
        y = unpermute(grouped_mm(h, w2, offs=offsets), row_map, gates)
        torch.autograd.grad(y, (x, gates, w1, w2, w3), grad_y)
    return step


def dense_step():
    y = (F.silu(x @ W1) * (x @ W3)) @ W2
    torch.autograd.grad(y, (x, W1, W2, W3), grad_y)


flops = 3 * 2 * T * k * 3 * D * FF  # forward + backward (2x) of three matmuls per routed slot
shape = f"T={T} D={D} F={FF} E={E} k={k}"
moe_ms = bench(lambda i: moe_step(ops.moe_permute, ops.moe_unpermute), graph=False)
moe_ref_ms = bench(lambda i: moe_step(ops.moe_permute_reference, ops.moe_unpermute_reference), graph=False)
dense_ms = bench(lambda i: dense_step, graph=False)
report('MoE layer fwd+bwd', shape, moe_ms, moe_ref_ms, flops=flops)
report('dense SwiGLU fwd+bwd', f"T={T} D={D} hidden={k * FF}", dense_ms, flops=flops)
del x, w1, w2, w3, W1, W2, W3

# -----------------------------------------------------------------------------
# latent decode, R=512 P=64 bf16: bytes = the cache entries read + q + out

R, P, TMAX = 512, 64, 8192


def einsum_decode(q_latent, q_pe, c_kv, k_pe, lengths, scale):
    """The absorbed decode as plain einsums in the input dtype (softmax in fp32): what PyTorch does
    without the kernel and without the reference's fp32 upcast of the cache."""
    scores = (torch.einsum('bhr,btr->bht', q_latent, c_kv) + torch.einsum('bhp,btp->bht', q_pe, k_pe)).float()
    beyond = torch.arange(c_kv.shape[1], device=c_kv.device) >= lengths.view(-1, 1)
    p = (scores * scale).masked_fill(beyond.unsqueeze(1), float('-inf')).softmax(-1)
    return torch.einsum('bht,btr->bhr', p.to(c_kv.dtype), c_kv)


for B, H, ragged in [(32, 16, False), (32, 16, True), (32, 128, False), (32, 128, True), (1, 16, False),
                     (1, 128, False)]:
    lengths = (torch.randint(1, TMAX + 1, (B,), device='cuda') if ragged else torch.full((B,), TMAX, device='cuda'))
    lengths = lengths.to(torch.int32)
    sets = min(8, math.ceil(100e6 / (B * TMAX * (R + P) * 2)))  # more than L2 holds
    inputs = [(torch.randn(B, H, R, dtype=bf16, device='cuda'), torch.randn(B, H, P, dtype=bf16, device='cuda'),
               torch.randn(B, TMAX, R, dtype=bf16, device='cuda'), torch.randn(B, TMAX, P, dtype=bf16, device='cuda'),
               lengths, 1 / math.sqrt(192)) for _ in range(sets)]
    n = lengths.sum().item()
    nbytes, flops = n * (R + P) * 2 + B * H * (R + P + R) * 2, 2 * H * n * (R + P + R)
    ms = bench(lambda i: lambda: ops.latent_decode(*inputs[i]), sets=sets)
    ref = bench(lambda i: lambda: ops.latent_decode_reference(*inputs[i]), sets=sets)
    shape = f"B={B} T={TMAX}{' ragged' if ragged else ''} H={H}"
    report('latent_decode', shape, ms, ref, nbytes, flops)
    report('bf16 einsum decode', shape, bench(lambda i: lambda: einsum_decode(*inputs[i]), sets=sets), None, nbytes, flops)
    del inputs

# -----------------------------------------------------------------------------
# sliding-window attention forward + backward as MLA's training runs it (model.cached_attention, heads of
# V3's shape: q/k 192, v 128): flex_attention's block-sparse kernel against SDPA with the dense band mask
# (ref), and full causal SDPA, the ceiling without a window. FLOPs: 2 matmuls forward, 4 backward, over
# the score entries each one computes: the band's for the window, the causal triangle's for the ceiling

def attention_step(window, q, k, v, dy):
    attn = model.MLA(model.ModelConfig(n_head=16, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                       attn_window=window))
    def step():
        y = model.cached_attention(attn, q, k, v)
        torch.autograd.grad(y, (q, k, v), dy)
    return step


B, H, W = 8, 16, 512
for T in (2048, 8192):
    q, k = [torch.randn(B, T, H, 192, dtype=bf16, device='cuda', requires_grad=True) for _ in range(2)]
    v = torch.randn(B, T, H, 128, dtype=bf16, device='cuda', requires_grad=True)
    dy = torch.randn(B, T, H, 128, dtype=bf16, device='cuda')
    band = W * (W + 1) // 2 + (T - W) * W  # visible score entries per head
    flops_per_entry = 3 * 2 * B * H * (192 + 128)
    flex_ms = bench(lambda i: attention_step(W, q, k, v, dy), graph=False)
    model.USE_FLEX = False
    masked_ms = bench(lambda i: attention_step(W, q, k, v, dy), graph=False)
    model.USE_FLEX = True
    causal_ms = bench(lambda i: attention_step(0, q, k, v, dy), graph=False)
    shape = f"B={B} H={H} T={T} d=192/128"
    report('window attention fwd+bwd, flex', f"{shape} window={W}", flex_ms, masked_ms, flops=band * flops_per_entry)
    report('window attention fwd+bwd, SDPA mask', f"{shape} window={W}", masked_ms, flops=band * flops_per_entry)
    report('causal attention fwd+bwd, SDPA', shape, causal_ms, flops=T * (T + 1) // 2 * flops_per_entry)
    del q, k, v, dy

# -----------------------------------------------------------------------------

header = ('op', 'shape', 'ms', 'ref ms', 'speedup', 'GB/s', 'TFLOP/s', '% of floor')
table = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}: copy {COPY_GBS:.0f} GB/s, "
         f"bf16 matmul {MM_TFLOPS:.0f} TFLOP/s; medians of {REPS}; MoE layer / dense = {moe_ms / dense_ms:.2f}",
         '', *markdown_table(header, rows)]
print('\n' + '\n'.join(table))
if args.out:
    write_text(args.out, '\n'.join(table) + '\n')
