"""
LoRA (Hu et al., arXiv:2106.09685) for model.py's Transformer: a weight W becomes
W + (alpha / rank) A B, A random and B zero, so a fresh adapter changes nothing; only A and B train.

Targets are model.py's names, and a name adapts every weight it names: the attention projections
wq, wq_a, wq_b, wkv_a, wkv_b, wo (wqkv for 'mha'); w1, w2, w3 of the dense and shared-expert MLPs
and of the routed experts, whose stacked [E, D, I] weights get per-expert factors A [E, D, r],
B [E, r, I], applied with the same grouped matmuls on the rows sorted by expert (MoE.expert_mm).
The router is not a target: its weight feeds a top-k whose choice an adapter would move silently.
The MTP block is left alone (a training aid, unused at inference).

Why not peft for training: peft adapts nn.Linear (and a few other module types) by wrapping them;
the routed experts here are stacked nn.Parameters used through grouped matmuls, which it cannot
reach, and its wrappers rename the base weights that checkpoints and the latent decode path read.
The ~60 lines below cover every target and leave the base's names alone. Exports use peft's
*format* instead (hf.py peft_adapter: a LoRA run's base plus adapter_config.json and
adapter_model.safetensors, written by hand: peft would need the whole transformers model built
to save them), and every target has an exact counterpart there, so nothing is refused: the
attention projections are target_modules; w1/w2/w3 are target_parameters (peft 0.21's LoRA on
nn.Parameter), because on DeepSeek models peft reads gate_proj/up_proj/down_proj in
target_modules as the routed experts and would move the dense and shared-expert adapters onto
them. transformers 5 fuses the routed experts into [E, 2I, D] gate_up_proj and [E, D, I]
down_proj; per expert, w1's and w3's factors become one rank-2r pair (A stacked, B block-
diagonal, alpha doubled: the same scale), as peft itself converts per-expert adapters. Loading
them needs transformers 5's fused layout (tested: peft 0.21.2); peft refuses dropout on
target_parameters, so it is written as 0 (it only acts in training).

    python convert.py merge --out_dir=out-lora --to=out-merged   # base + adapters -> a plain checkpoint
"""
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MoE, grouped_mm

TARGETS = ('wq', 'wq_a', 'wq_b', 'wkv_a', 'wkv_b', 'wo', 'wqkv', 'w1', 'w2', 'w3')


class LoRA(nn.Module):
    """The low-rank update of one weight: x -> scale * dropout(x) A B. With n_experts, one pair of
    factors per expert, applied to rows grouped by expert (offsets as in model.grouped_mm)."""
    def __init__(self, d_in, d_out, rank, alpha, dropout, n_experts=0):
        super().__init__()
        lead = (n_experts,) if n_experts else ()
        bound = 1 / math.sqrt(d_in)  # peft's kaiming-uniform(a=sqrt(5)) init of A
        self.A = nn.Parameter(torch.empty(*lead, d_in, rank).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(*lead, rank, d_out))
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)

    def forward(self, x, offsets=None):
        x = self.drop(x)
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        if offsets is None:
            return self.scale * (x @ A @ B)
        # grouped matmuls take rows of a multiple of 16 bytes: the rank padded with zero factors to one
        pad = -A.size(-1) % 8
        A, B = F.pad(A, (0, pad)), F.pad(B, (0, 0, 0, pad))
        return self.scale * grouped_mm(grouped_mm(x, A, offsets), B, offsets)

    def delta(self):
        return self.scale * (self.A @ self.B)  # [d_in, d_out], or [E, d_in, d_out]


def add_linear_lora(linear, inputs, output):
    """Forward hook: the base nn.Linear's output plus its adapter's."""
    return output + linear.lora(inputs[0])


def expert_mm_with_lora(moe, x, name, offsets):
    y = MoE.expert_mm(moe, x, name, offsets)
    lora = getattr(moe, f'lora_{name}', None)
    return y if lora is None else y + lora(x, offsets)


def add_lora(model, rank, alpha, dropout, targets):
    """Freeze the model and give every targeted weight an adapter; -> the adapted weights' names."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or rank <= 0:
        raise ValueError(f"lora_targets {','.join(unknown)}: not one of {','.join(TARGETS)}" if unknown
                         else f"lora_rank={rank}: must be > 0")
    model.requires_grad_(False)
    targets, adapted = list(dict.fromkeys(targets)), []  # a name given twice adapts once
    for name, module in list(model.named_modules()):
        if name.startswith('mtp.'):
            continue
        for attr in targets:
            target = getattr(module, attr, None)
            if isinstance(target, nn.Linear):
                target.lora = LoRA(target.in_features, target.out_features, rank, alpha, dropout)
                target.register_forward_hook(add_linear_lora)
            elif isinstance(module, MoE) and isinstance(target, nn.Parameter):
                E, d_in, d_out = target.shape
                module.add_module(f'lora_{attr}', LoRA(d_in, d_out, rank, alpha, dropout, n_experts=E))
                module.expert_mm = types.MethodType(expert_mm_with_lora, module)  # this MoE's matmuls add it
            else:
                continue
            adapted.append(f'{name}.{attr}')
    if not adapted:
        raise ValueError(f"lora_targets={','.join(targets)}: this model has none of these weights")
    return adapted


def lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRA)]


def lora_state_dict(model):
    """The adapters alone: what a LoRA checkpoint stores."""
    return {f'{name}.{k}': v for name, m in lora_modules(model) for k, v in m.state_dict().items()}


def load_lora_state(model, state):
    expected = set(lora_state_dict(model))
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)
        raise ValueError(f"adapters do not fit the model: {len(diff)} names differ, e.g. {diff[0]}")
    model.load_state_dict(state, strict=False)


def weight_name(adapter_name):
    """'layers.0.attn.wq.lora' -> 'layers.0.attn.wq.weight'; 'layers.1.ffn.lora_w1' -> 'layers.1.ffn.w1'."""
    owner, _, leaf = adapter_name.rpartition('.')
    return f'{owner}.weight' if leaf == 'lora' else f'{owner}.{leaf[len("lora_"):]}'


@torch.no_grad()
def merged_state_dict(model):
    """Base weights with every adapter folded in: a plain Transformer state dict with the same
    logits as base + adapters (up to float rounding; dropout off)."""
    adapters = set(lora_state_dict(model))
    state = {k: v.clone() for k, v in model.state_dict().items() if k not in adapters}
    for name, lora in lora_modules(model):
        delta = lora.delta()
        key = weight_name(name)
        state[key] += (delta.T if delta.dim() == 2 else delta).to(state[key].dtype)  # Linear keeps [out, in]
    return state


def num_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
