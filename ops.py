"""
The two seams where model.py hands work to CUDA kernels, registered as torch ops.

  moe_permute    token rows -> copies grouped by expert, with per-expert end offsets
  moe_unpermute  expert outputs -> each token's k outputs summed with its gate weights
  latent_decode  one decode step of absorbed MLA attention over the latent KV cache

Every op has a pure-PyTorch reference (the *_reference functions). It runs wherever the CUDA
extension in csrc/ is not available, and it is what the kernels are tested against. The ops are
torch.library custom ops with fake (meta) kernels and autograd formulas, so torch.compile traces
through them without a graph break. Set MLA_MOE_NO_KERNELS=1 to force the references.
"""
import os
import warnings

import torch
from torch import Tensor

from flags import one_line

# -----------------------------------------------------------------------------
# pure-PyTorch references

def _acc_dtype(t: Tensor):
    return torch.promote_types(t.dtype, torch.float32)  # fp32 math for bf16/fp16, fp64 stays fp64


def moe_permute_reference(x: Tensor, expert_ids: Tensor, n_experts: int):
    """x [T, D], expert_ids [T, k] -> x_sorted [T*k, D], offsets [E] int32, row_map [T*k] int32.
    Token slot s = t*k + j lands at row row_map[s] of x_sorted; expert e owns rows
    offsets[e-1]:offsets[e] (end offsets, the form grouped_mm takes)."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # sorted row -> slot
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(flat.numel(), device=flat.device)
    x_sorted = x[order // expert_ids.shape[1]]
    # scatter_add, not bincount: bincount reads the max back to the host
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return x_sorted, counts.cumsum(0).to(torch.int32), row_map.to(torch.int32)


def moe_unpermute_reference(y_sorted: Tensor, row_map: Tensor, weights: Tensor):
    """y_sorted [T*k, D], row_map [T*k], weights [T, k] -> y [T, D] = sum_j w[t,j] y_sorted[row_map[t*k+j]]"""
    T, k = weights.shape
    acc = _acc_dtype(y_sorted)
    y = y_sorted[row_map.long()].view(T, k, y_sorted.shape[-1]).to(acc)  # T may be 0 (a rank with no tokens)
    return torch.einsum('tkd,tk->td', y, weights.to(acc)).to(y_sorted.dtype)


def moe_unpermute_backward_reference(grad_y: Tensor, y_sorted: Tensor, row_map: Tensor, weights: Tensor):
    """Gradients of moe_unpermute: grad_y_sorted [T*k, D] (grad_y scattered back, scaled by the
    weights) and grad_weights [T, k] (each expert output dotted with its token's grad_y)."""
    T, k = weights.shape
    rows, acc = row_map.long(), _acc_dtype(y_sorted)
    g = grad_y.to(acc).repeat_interleave(k, dim=0)  # slot order
    grad_y_sorted = torch.empty_like(y_sorted)
    grad_y_sorted[rows] = (g * weights.reshape(-1, 1).to(acc)).to(y_sorted.dtype)
    grad_weights = (g * y_sorted[rows].to(acc)).sum(-1).view(T, k).to(weights.dtype)
    return grad_y_sorted, grad_weights


def latent_decode_reference(q_latent: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor,
                            lengths: Tensor, scale: float):
    """q_latent [B, H, R], q_pe [B, H, P], c_kv [B, Tmax, R], k_pe [B, Tmax, P], lengths [B] ->
    out_latent [B, H, R]: softmax(scale * (q_latent c_kv^T + q_pe k_pe^T)) c_kv over the first
    lengths[b] cache entries of each sequence. Math in fp32 (or fp64)."""
    acc = _acc_dtype(q_latent)
    c = c_kv.to(acc)
    scores = torch.einsum('bhr,btr->bht', q_latent.to(acc), c)
    scores = (scores + torch.einsum('bhp,btp->bht', q_pe.to(acc), k_pe.to(acc))) * scale
    beyond = torch.arange(c_kv.shape[1], device=c_kv.device) >= lengths.view(-1, 1)
    scores = scores.masked_fill(beyond.unsqueeze(1), float('-inf'))
    return torch.einsum('bht,btr->bhr', scores.softmax(-1), c).to(q_latent.dtype)

# -----------------------------------------------------------------------------
# the CUDA extension: built on first import where CUDA and a compiler exist, cached by torch

def _load_extension():
    if os.environ.get('MLA_MOE_NO_KERNELS') == '1' or not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load
        major, minor = torch.cuda.get_device_capability()
        csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc')
        return load(name='mla_moe_kernels', with_cuda=True,
                    sources=[os.path.join(csrc, f) for f in ('ops.cpp', 'moe.cu', 'latent_decode.cu')],
                    extra_cflags=['-O3'],
                    extra_cuda_cflags=['-O3', f'-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}'])
    except Exception as e:  # no nvcc / CUDA_HOME, or a compile error: fall back, say so once
        warnings.warn(f'mla_moe: CUDA kernels not built, using the PyTorch references ({one_line(e)})')
        return None


_ext = _load_extension()

# -----------------------------------------------------------------------------
# the ops: reference everywhere, the kernel on CUDA tensors when the extension loaded

@torch.library.custom_op('mla_moe::moe_permute', mutates_args=())
def _moe_permute(x: Tensor, expert_ids: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    return moe_permute_reference(x, expert_ids, n_experts)


@_moe_permute.register_fake
def _(x, expert_ids, n_experts):
    rows = expert_ids.numel()
    return (x.new_empty(rows, x.shape[1]), x.new_empty(n_experts, dtype=torch.int32),
            x.new_empty(rows, dtype=torch.int32))


@torch.library.custom_op('mla_moe::moe_unpermute', mutates_args=())
def _moe_unpermute(y_sorted: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    return moe_unpermute_reference(y_sorted, row_map, weights)


@_moe_unpermute.register_fake
def _(y_sorted, row_map, weights):
    return y_sorted.new_empty(weights.shape[0], y_sorted.shape[1])


@torch.library.custom_op('mla_moe::moe_unpermute_backward', mutates_args=())
def _moe_unpermute_backward(grad_y: Tensor, y_sorted: Tensor, row_map: Tensor,
                            weights: Tensor) -> tuple[Tensor, Tensor]:
    return moe_unpermute_backward_reference(grad_y, y_sorted, row_map, weights)


@_moe_unpermute_backward.register_fake
def _(grad_y, y_sorted, row_map, weights):
    return torch.empty_like(y_sorted), torch.empty_like(weights)


@torch.library.custom_op('mla_moe::latent_decode', mutates_args=())
def _latent_decode(q_latent: Tensor, q_pe: Tensor, c_kv: Tensor, k_pe: Tensor,
                   lengths: Tensor, scale: float) -> Tensor:
    return latent_decode_reference(q_latent, q_pe, c_kv, k_pe, lengths, scale)


@_latent_decode.register_fake
def _(q_latent, q_pe, c_kv, k_pe, lengths, scale):
    return torch.empty_like(q_latent)

# autograd: permute's backward sums each token's k row gradients (unpermute with unit weights);
# unpermute's backward has its own op, which gives both gradients in one pass

def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.k = inputs[1].shape[1]


def _permute_backward(ctx, grad_x_sorted, _grad_offsets, _grad_row_map):
    (row_map,) = ctx.saved_tensors
    ones = grad_x_sorted.new_ones(row_map.numel() // ctx.k, ctx.k)
    return _moe_unpermute(grad_x_sorted.contiguous(), row_map, ones), None, None


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_y):
    y_sorted, row_map, weights = ctx.saved_tensors
    grad_y_sorted, grad_weights = _moe_unpermute_backward(grad_y.contiguous(), y_sorted, row_map, weights)
    return grad_y_sorted, None, grad_weights


_moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup)
_moe_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)

# CUDA tensors go to the kernels (a 'cuda' kernel takes precedence over the default implementation,
# which stays the reference for every other device)
if _ext is not None:
    _moe_permute.register_kernel('cuda')(_ext.moe_permute)
    _moe_unpermute.register_kernel('cuda')(_ext.moe_unpermute)
    _moe_unpermute_backward.register_kernel('cuda')(_ext.moe_unpermute_backward)
    _latent_decode.register_kernel('cuda')(_ext.latent_decode)

# -----------------------------------------------------------------------------
# what model.py calls

def moe_permute(x: Tensor, expert_ids: Tensor, n_experts: int):
    return _moe_permute(x.contiguous(), expert_ids.contiguous(), n_experts)


def moe_unpermute(y_sorted: Tensor, row_map: Tensor, weights: Tensor) -> Tensor:
    return _moe_unpermute(y_sorted.contiguous(), row_map, weights.contiguous())


def latent_decode(q_latent, q_pe, c_kv, k_pe, lengths, scale: float) -> Tensor:
    return _latent_decode(q_latent.contiguous(), q_pe.contiguous(), c_kv, k_pe, lengths, scale)
