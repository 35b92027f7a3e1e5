"""
FP8 training (DeepSeek-V3 sec. 3.3): the matmuls of the attention projections, the dense and shared
MLPs, the LM head and the routed experts run in float8 e4m3, forward and backward; master weights,
optimizer state, norms, router, embeddings and the loss stay as they are.

Scaling: one power-of-two scale per row of each operand along the contraction dimension (row-wise),
the form torch._scaled_mm and torch._scaled_grouped_mm take on Hopper. DeepSeek-V3 scaled finer (1x128
tiles of activations, 128x128 blocks of weights) because its outliers are per channel; a row-wise
scale is per token and per output channel, which the core ops run without a kernel of ours. The
scales are powers of two, so scaling itself rounds nothing; e4m3's 3 mantissa bits do (about 2^-4
relative per element, averaged out over the contraction).

The one exception is the routed experts' weight gradient, x_e^T dy_e per expert: its contraction runs
over the expert's tokens, whose row-wise scales would be per group of ragged length; it stays a bf16
grouped matmul. Matmuls whose sizes are not multiples of 16 (the tensor cores' fp8 tiles) stay bf16, and
so do the experts on GPUs without fp8 grouped matmuls (all but compute capability 9.0 and 10.0).

With LoRA (lora.py) the frozen base runs in fp8 (forward and the input gradient; it has no weight
gradient) and the adapters in bf16.

    use_fp8(model)   # before compilation; the state_dict keeps its names, checkpoints stay ordinary
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MoE

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
OUT = torch.bfloat16  # what the fp8 matmuls write: bf16, as autocast's matmuls do
FAST_ACCUM = False    # Hopper's fast accumulation skips the periodic fp32 promotion DeepSeek-V3 relies on


def capability(device):
    """A CUDA device's compute capability, None for any other device (or one that is not there: its own
    flag check says so)."""
    try:
        return torch.cuda.get_device_capability(device) if torch.device(device).type == 'cuda' else None
    except (RuntimeError, AssertionError, ValueError):
        return None


def supported(device):
    """Row-wise scaled fp8 matmuls: Hopper (compute capability 9.0) or later."""
    return (capability(device) or (0, 0)) >= (9, 0)


def grouped_supported(device):
    """torch._scaled_grouped_mm runs on compute capability 9.0 and 10.0 only; CPUs take fp8.grouped_mm's
    loop over the groups."""
    return torch.device(device).type == 'cpu' or capability(device) in ((9, 0), (10, 0))


def quantize(x):
    """x [..., K] -> (x8, scale [..., 1]) with x ~= x8 * scale: one power-of-two scale per row over the
    last dimension, the smallest that keeps the row's largest magnitude within e4m3's range."""
    amax = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    return (x.float() / scale).to(E4M3), scale


def mm(a, b):
    """a [M, K] @ b [K, N] in fp8 -> bf16: a scaled per row, b per column (both along K)."""
    a8, sa = quantize(a.contiguous())
    bt8, sb = quantize(b.t().contiguous())  # b's columns as rows; bt8.t() is the column-major b
    return torch._scaled_mm(a8, bt8.t(), scale_a=sa, scale_b=sb.t(), out_dtype=OUT, use_fast_accum=FAST_ACCUM)


def grouped_mm(a, b, offsets):
    """a [M, K] rows grouped by expert (end offsets [E], int32) @ b [E, K, N] in fp8 -> bf16 [M, N]."""
    a8, sa = quantize(a.contiguous())
    bt8, sb = quantize(b.transpose(-2, -1).contiguous())  # [E, N, K]: each expert's columns as rows
    if a.is_cuda:
        return torch._scaled_grouped_mm(a8, bt8.transpose(-2, -1), sa.squeeze(-1), sb.squeeze(-1), offs=offsets,
                                        out_dtype=OUT, use_fast_accum=FAST_ACCUM)
    # elsewhere (CPU tests) the same arithmetic one group at a time
    out, start = a.new_empty(a.size(0), b.size(-1), dtype=OUT), 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = torch._scaled_mm(a8[start:end], bt8[e].t(), scale_a=sa[start:end], scale_b=sb[e].t(),
                                              out_dtype=OUT)
        start = end
    return out


class Linear(torch.autograd.Function):
    """y = x w^T with x [M, K], w [N, K], all three matmuls in fp8."""
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return mm(x, w.t())

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = mm(dy, w).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:  # the contraction runs over the tokens: fp8 where they fill its tiles
            dw = mm(dy.t(), x) if x.size(0) % 16 == 0 else dy.t().to(OUT) @ x.to(OUT)
            dw = dw.to(w.dtype)
        return dx, dw


class GroupedMM(torch.autograd.Function):
    """The routed experts' y = x_e w_e per expert group: forward and dx in fp8, dw in bf16 (see above)."""
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return grouped_mm(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dx = grouped_mm(dy, w.transpose(-2, -1), offsets).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = F.grouped_mm(x.to(OUT).t(), dy.to(OUT), offs=offsets).to(w.dtype)
        return dx, dw, None


def matmul_dtype(x):
    """The dtype a matmul of x gives where fp8 is off: autocast's, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class FP8Linear(nn.Linear):
    """nn.Linear (no bias) whose forward runs in fp8: same parameter, same state_dict name."""
    def forward(self, x):
        y = Linear.apply(x.flatten(0, -2), self.weight).view(*x.shape[:-1], self.out_features)
        return y.to(matmul_dtype(x))


def expert_grouped_mm(x, w, offsets):
    return GroupedMM.apply(x, w, offsets).to(x.dtype)  # MoE.forward has cast x to the matmuls' dtype


def fits(*sizes):
    return all(s % 16 == 0 for s in sizes)


def use_fp8(model):
    """Swap the model's bias-free nn.Linear layers for FP8Linear and its MoE layers' grouped matmuls
    for fp8 ones, where their sizes fit fp8 tiles (and, for the experts, where the device has fp8
    grouped matmuls) -> the names of the weights that stay bf16. The model is on its device already."""
    kept = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.bias is None:
            if fits(module.in_features, module.out_features):
                module.__class__ = FP8Linear  # the same object: its parameter, hooks and ties stay
            else:
                kept.append(f'{name}.weight')
        elif isinstance(module, MoE):
            if fits(module.cfg.n_embd, module.cfg.moe_inter_dim) and grouped_supported(module.w1.device):
                module.grouped_mm = expert_grouped_mm
            else:
                kept += [f'{name}.{w}' for w in ('w1', 'w2', 'w3')]
    return kept
