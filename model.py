"""
A DeepSeek-style decoder in one file: Multi-head Latent Attention (MLA) and DeepSeekMoE
(shared + fine-grained routed experts), written as the DeepSeek-V2/V3 papers' equations, with
nanoGPT's conveniences. Names follow DeepSeek-V3's reference inference/model.py.
References:
1) DeepSeek-V2, arXiv:2405.04434 (MLA, DeepSeekMoE, weight absorption)
2) DeepSeek-V3, arXiv:2412.19437 (sigmoid gating, auxiliary-loss-free balancing, MTP)
3) nanoGPT, github.com/karpathy/nanoGPT
"""
import functools
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import ops
from muon import Muon, Optimizers


# ModelConfig fields that shape training, not the weights: a run from trained weights may change them
TRAINING_FIELDS = ('dropout', 'bias_update_speed', 'balance_loss_alpha', 'router_z_loss', 'mtp_lambda')


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    block_size: int = 256
    n_layer: int = 6
    n_embd: int = 384
    n_head: int = 6
    attn: str = 'mla'              # 'mla', or 'mha' for a standard-attention baseline
    attn_window: int = 0           # sliding window: attend to at most the last attn_window tokens; 0 = all
    # MLA: queries through a low-rank bottleneck (0 = plain projection, as V2-Lite), keys and
    # values through a joint latent c_kv, plus one decoupled RoPE key shared by all heads
    q_lora_rank: int = 0
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # YaRN context extension as DeepSeek's released configs use it (factor 1 = off)
    rope_scaling_factor: float = 1.0
    rope_original_max_position: int = 4096  # the context the model was pretrained at
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    # feed-forward: the first n_dense_layers are a dense SwiGLU MLP, the rest DeepSeekMoE
    # (n_routed_experts = 0 makes every layer dense)
    n_dense_layers: int = 1
    dense_inter_dim: int = 1024
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2   # top-k
    moe_inter_dim: int = 256
    score_func: str = 'softmax'    # 'softmax' (V2) or 'sigmoid' (V3)
    route_scale: float = 1.0
    n_expert_groups: int = 1       # group-limited routing: pick the top n_limited_groups groups,
    n_limited_groups: int = 1      # then the top-k experts inside them
    # balancing: V3's auxiliary-loss-free bias, the sequence-wise balance loss, router z-loss
    bias_update_speed: float = 0.001   # gamma
    balance_loss_alpha: float = 0.0001
    router_z_loss: float = 0.0
    dropout: float = 0.0
    tie_embeddings: bool = False
    mtp_depth: int = 0             # multi-token prediction (V3): 0 = off, 1 = predict one more token
    mtp_lambda: float = 0.3

    def __post_init__(self):
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"ModelConfig.{field} = {getattr(self, field)!r}: {why}")
        for f in ('vocab_size', 'block_size', 'n_layer', 'n_embd', 'n_head', 'kv_lora_rank',
                  'qk_nope_head_dim', 'v_head_dim', 'dense_inter_dim'):
            need(getattr(self, f) > 0, f, "must be > 0")
        need(self.attn in ('mla', 'mha'), 'attn', "must be 'mla' or 'mha'")
        need(self.attn_window >= 0, 'attn_window', "must be >= 0 (0 = full causal attention)")
        need(self.attn == 'mla' or self.n_embd % (2 * self.n_head) == 0, 'n_embd',
             "must split into n_head heads of even size for 'mha'")
        need(self.q_lora_rank >= 0, 'q_lora_rank', "must be >= 0 (0 = no query compression)")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, 'qk_rope_head_dim',
             "must be a positive even number (RoPE rotates pairs)")
        need(0 <= self.n_dense_layers <= self.n_layer, 'n_dense_layers', "must be in [0, n_layer]")
        need(self.n_routed_experts >= 0, 'n_routed_experts', "must be >= 0")
        need(self.score_func in ('softmax', 'sigmoid'), 'score_func', "must be 'softmax' or 'sigmoid'")
        need(self.mtp_depth in (0, 1), 'mtp_depth', "must be 0 or 1")
        need(self.rope_scaling_factor >= 1.0, 'rope_scaling_factor', "must be >= 1 (1 = no YaRN)")
        need(self.rope_original_max_position > 0, 'rope_original_max_position', "must be > 0")
        need(0.0 <= self.dropout < 1.0, 'dropout', "must be in [0, 1)")
        if self.n_routed_experts:
            need(self.moe_inter_dim > 0, 'moe_inter_dim', "must be > 0")
            need(1 <= self.n_activated_experts <= self.n_routed_experts, 'n_activated_experts',
                 f"must be in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0,
                 'n_expert_groups', f"must divide n_routed_experts={self.n_routed_experts}")
            need(1 <= self.n_limited_groups <= self.n_expert_groups, 'n_limited_groups',
                 f"must be in [1, n_expert_groups={self.n_expert_groups}]")
            need(self.n_limited_groups * self.n_routed_experts // self.n_expert_groups
                 >= self.n_activated_experts, 'n_limited_groups', "allowed groups hold fewer than top-k experts")

    @classmethod
    def from_settings(cls, settings, **overrides):
        """The model fields of a config file's settings (train.py's globals), overrides on top."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in settings.items() if k in names}, **overrides})

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_head_dims(self):
        """(query and key, value) head dims of the attention in use."""
        return (self.qk_head_dim, self.v_head_dim) if self.attn == 'mla' else (self.n_embd // self.n_head,) * 2

    def is_moe_layer(self, layer_id):
        return self.n_routed_experts > 0 and layer_id >= self.n_dense_layers


def padded_vocab(n):
    """A dataset's vocabulary rounded up to a multiple of 64, as nanoGPT's 50304: faster matmuls."""
    return 64 * math.ceil(n / 64)


def yarn_mscale(factor, mscale):
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_tables(head_dim, block_size, theta, cfg=None):
    """cos, sin [block_size, head_dim/2]; with cfg's YaRN (arXiv:2309.00071, as DeepSeek-V2/V3 and
    HF use it): slow dimensions interpolated by the factor, fast ones kept, a linear ramp between."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    scale = 1.0
    if cfg is not None and cfg.rope_scaling_factor > 1:
        f = cfg.rope_scaling_factor
        def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
            wavelength = cfg.rope_original_max_position / rotations
            return head_dim * math.log(wavelength / (2 * math.pi)) / (2 * math.log(theta))
        low = max(math.floor(dim_of(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(dim_of(cfg.rope_beta_slow)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
        freqs = freqs / f * ramp + freqs * (1 - ramp)
        m, m_all = cfg.rope_mscale, cfg.rope_mscale_all_dim
        scale = yarn_mscale(f, m) / yarn_mscale(f, m_all) if m and m_all else yarn_mscale(f, 1.0)
    angles = torch.outer(torch.arange(block_size).float(), freqs)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """x [B, T, H, d]; cos, sin [T, 1, d/2] or, per sequence, [B, T, 1, d/2]. Rotates interleaved
    pairs (x0, x1), as V3's complex-number form does."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).type_as(x)


def write_cache(cache, values, pos, rows):
    """Write values [B, T, ...] into the cache tensors [slots, L, ...] at rows (slots; default the
    first B) and positions pos [B, T] (default 0..T-1, a prefill). Position p lands in entry p % L:
    a cache shorter than the positions (a sliding window's) is a ring buffer and keeps the last L.
    Indexing by tensors keeps the shapes static, so a decode step can be captured in a CUDA graph."""
    B, T = values[0].shape[:2]
    L, device = cache[0].size(1), values[0].device
    rows = torch.arange(B, device=device) if rows is None else rows
    pos = torch.arange(T, device=device).expand(B, T) if pos is None else pos
    if T > L:  # a prefill longer than a ring: only its last L positions stay
        values, pos = [v[:, -L:] for v in values], pos[:, -L:]
    for c, v in zip(cache, values):
        c[rows[:, None], pos % L] = v.to(c.dtype)


def visible(pos, length, window=0):
    """[B, T, length] mask: may the query at position pos[b, t] see cache entry j? Entry j holds the
    latest position written there (j itself unless the cache is a ring, see write_cache); it is
    visible when that position is not after the query's and, with a sliding window, is one of the
    last `window` positions (the query's own included)."""
    j, last, q = torch.arange(length, device=pos.device), pos[:, -1:, None], pos[:, :, None]
    held = last - (last - j) % length
    seen = (held >= 0) & (held <= q)
    return seen & (held > q - window) if window else seen


USE_FLEX = True  # False: masked attention on CUDA takes SDPA's dense-mask path too (the tests' reference)


def flex_ok(cfg, device, training):
    """Does training and prefill attention under a window or packed documents run through
    flex_attention, a fused kernel that skips the masked-out blocks, rather than SDPA with a dense
    [T, T] mask (which takes SDPA off its flash kernel)?"""
    return (USE_FLEX and device.type == 'cuda'
            and min(cfg.attn_head_dims) >= 16        # flex's Triton kernels need head dims of 16 or more
            and not (training and cfg.dropout))      # flex has no attention dropout


def band_mask_mod(window, device, doc_ids=None):
    """flex_attention's mask_mod: causal, banded to the last `window` keys, and inside each document
    when doc_ids [B, T] are given."""
    width = torch.tensor(window, device=device)  # a tensor, not a constant: one compiled kernel for all windows
    def mask_mod(b, h, q_idx, kv_idx):
        seen = (q_idx >= kv_idx) & (q_idx - kv_idx < width)
        if doc_ids is not None:
            seen = seen & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return seen
    return mask_mod


@functools.cache
def window_block_mask(T, window, device):
    """The window's BlockMask alone is the same for every batch of T tokens: made once."""
    return create_block_mask(band_mask_mod(window, device), None, None, T, T, device=device)


def block_mask(T, window, device, doc_ids=None):
    """The BlockMask of band_mask_mod for T queries from position 0 (window 0: all of them); one over
    documents is the batch's own. While torch.compile traces, the window's is made in the graph too
    (a fused kernel per step): one kept from inside a graph would be its output, memory a CUDA graph
    reuses."""
    if doc_ids is None and not torch.compiler.is_compiling():
        return window_block_mask(T, window, device)
    B = None if doc_ids is None else doc_ids.size(0)
    return create_block_mask(band_mask_mod(window or T, device, doc_ids), B, None, T, T, device=device)


@functools.cache
def compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=True)  # prefills of every length share one kernel


def fused_flex_attention(q, k, v, mask, scale):
    """flex_attention is fast only compiled: in a compiled model it is traced into the graph as it
    is, in an eager one it goes through its own torch.compile."""
    flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    return flex(q, k, v, block_mask=mask, scale=scale)


def cached_attention(attn, q, k, v, cache=None, pos=None, rows=None, attn_mask=None):
    """Causal attention over [B, T, H, d] tensors, banded to the last attn_window keys where a window
    is set. With a per-head K/V cache, k and v are written into it; when decoding (pos [B, T] given),
    the queries attend to the cache up to their own positions. attn_mask [B, 1, T, T] (True = may
    attend) replaces the causal mask: packed documents, see Transformer.attention_mask; a BlockMask
    (window included) sends them through flex_attention. From position 0, a window alone takes
    flex_attention where flex_ok, else SDPA with a band mask."""
    mask, window = attn_mask, attn.cfg.attn_window
    if cache is not None:
        write_cache(cache, (k, v), pos, rows)
        if pos is not None:
            k, v = cache[0][:q.size(0)], cache[1][:q.size(0)]
            mask = visible(pos, k.size(1), window)[:, None]
    banded = pos is None and 0 < window < k.size(1)  # training and prefill, from position 0
    if banded and mask is None and flex_ok(attn.cfg, q.device, attn.training):
        mask = block_mask(q.size(1), window, q.device)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if isinstance(mask, BlockMask):
        return fused_flex_attention(q, k, v, mask, attn.softmax_scale).transpose(1, 2)
    if banded:
        band = visible(torch.arange(q.size(2), device=q.device)[None], k.size(2), window)
        mask = band if mask is None else mask & band
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                       scale=attn.softmax_scale, dropout_p=attn.dropout if attn.training else 0.0)
    return y.transpose(1, 2)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.n_head, cfg.n_embd
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        # YaRN sharpens attention over the longer context: DeepSeek's mscale^2 on the softmax scale
        mscale = yarn_mscale(cfg.rope_scaling_factor, cfg.rope_mscale_all_dim)
        self.softmax_scale = cfg.qk_head_dim ** -0.5 * mscale ** 2
        self.dropout = cfg.dropout
        self.cache, self.latent = None, False

    def setup_cache(self, batch_size, length, mode, dtype, device):
        c, H = self.cfg, self.cfg.n_head
        if mode == 'latent':  # all a token costs: its latent c_kv and its RoPE key
            shapes = [(c.kv_lora_rank,), (c.qk_rope_head_dim,)]
        else:                 # the decompressed per-head keys and values
            shapes = [(H, c.qk_head_dim), (H, c.v_head_dim)]
        self.cache = tuple(torch.zeros(batch_size, length, *s, dtype=dtype, device=device) for s in shapes)
        self.latent = mode == 'latent'

    def forward(self, x, cos, sin, pos=None, rows=None, attn_mask=None):
        """pos [B, T]: the tokens' positions when decoding over the cache, None from position 0
        (training, prefill); rows: the cache slots a prefill writes to (default the first B)."""
        c = self.cfg
        B, T, _ = x.shape
        q = self.wq(x) if not c.q_lora_rank else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, c.n_head, c.qk_head_dim).split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = self.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], -1)
        c_kv, k_pe = self.kv_norm(c_kv), apply_rope(k_pe.unsqueeze(2), cos, sin)
        if self.latent:
            write_cache(self.cache, (c_kv, k_pe.squeeze(2)), pos, rows)
            if pos is not None:
                return self.wo(self.latent_attention(q_nope, q_pe, pos).flatten(2))
        # training and prefill: flash attention over the decompressed keys and values (a latent
        # cache has just been written above; a naive one is written by cached_attention)
        k_nope, v = self.wkv_b(c_kv).view(B, T, c.n_head, -1).split([c.qk_nope_head_dim, c.v_head_dim], -1)
        q = torch.cat([q_nope, q_pe], -1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, c.n_head, -1)], -1)
        cache = None if self.latent else self.cache
        return self.wo(cached_attention(self, q, k, v, cache, pos, rows, attn_mask).flatten(2))

    def latent_attention(self, q_nope, q_pe, pos):
        """Decoding with the up-projections absorbed (V2 sec. 2.1.2): W_UK folds into the query, so
        the cache holds only c_kv and k_pe; W_UV is applied to the attended latent afterwards."""
        c = self.cfg
        B, T = q_nope.shape[:2]
        c_cache, pe_cache = self.cache[0][:B], self.cache[1][:B]
        wkv_b = self.wkv_b.weight.view(c.n_head, -1, c.kv_lora_rank)
        w_uk, w_uv = wkv_b[:, :c.qk_nope_head_dim], wkv_b[:, c.qk_nope_head_dim:]
        q_latent = torch.einsum('bshd,hdc->bshc', q_nope, w_uk).to(c_cache.dtype)
        L = c_cache.size(1)
        if T == 1 and not 0 < c.attn_window < L:  # one token each: the CUDA kernel's seam; a ring
            lengths = (pos[:, 0] + 1).clamp(max=L).to(torch.int32)  # of the window is all visible
            o = ops.latent_decode(q_latent[:, 0], q_pe[:, 0].to(c_cache.dtype), c_cache, pe_cache,
                                  lengths, self.softmax_scale).unsqueeze(1)
        else:       # several (speculative verification), or a sliding window the kernel does not
                    # know yet: the same equations, masked per query
            scores = (torch.einsum('bshc,btc->bsht', q_latent, c_cache) +
                      torch.einsum('bshr,btr->bsht', q_pe.to(c_cache.dtype), pe_cache)) * self.softmax_scale
            seen = visible(pos, L, c.attn_window)
            scores = scores.masked_fill(~seen[:, :, None, :], float('-inf'))
            o = torch.einsum('bsht,btc->bshc', scores.softmax(-1, dtype=torch.float32).type_as(c_cache), c_cache)
        return torch.einsum('bshc,hdc->bshd', o.type_as(w_uv), w_uv)


class MHA(nn.Module):
    """Standard multi-head attention with RoPE: the baseline MLA is measured against."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.head_dim = cfg, cfg.n_embd // cfg.n_head
        self.wqkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.softmax_scale = self.head_dim ** -0.5
        self.dropout = cfg.dropout
        self.cache = None

    def setup_cache(self, batch_size, length, mode, dtype, device):
        shape = (batch_size, length, self.cfg.n_head, self.head_dim)
        self.cache = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, x, cos, sin, pos=None, rows=None, attn_mask=None):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.cfg.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.wo(cached_attention(self, q, k, v, self.cache, pos, rows, attn_mask).flatten(2))


class MLP(nn.Module):
    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def top_k(x, k):
    """x.topk(k, -1) -> (values, indices). Under torch.compile as k argmax passes, which inductor fuses
    with the rest of the router into one kernel; torch.topk is a library call plus a sort there, and on
    a GPU it cost more than the rest of the router together (notes/training.md, section 5)."""
    if not torch.compiler.is_compiling():
        return x.topk(k, -1)
    ids, picks, rest = torch.arange(x.size(-1), device=x.device), [], x
    for _ in range(k):
        picks.append(rest.argmax(-1, keepdim=True))
        rest = rest.masked_fill(ids == picks[-1], float('-inf'))
    indices = torch.cat(picks, -1)
    return x.gather(-1, indices), indices


class Gate(nn.Module):
    """Router. The bias (a buffer, not trained by gradients) shifts which experts are chosen, never
    the weights they get: V3's auxiliary-loss-free balancing."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.n_embd))
        self.register_buffer('bias', torch.zeros(cfg.n_routed_experts))

    def forward(self, x):
        c = self.cfg
        logits = F.linear(x, self.weight).float()
        scores = logits.softmax(-1) if c.score_func == 'softmax' else logits.sigmoid()
        biased = scores + self.bias
        if c.n_expert_groups > 1:
            grouped = biased.view(x.size(0), c.n_expert_groups, -1)
            # a group's score: its best expert (V2), or its best two with the bias (V3)
            group_scores = grouped.amax(-1) if c.score_func == 'softmax' else top_k(grouped, 2)[0].sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, top_k(group_scores, c.n_limited_groups)[1], True)
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float('-inf')).flatten(1)
        indices = top_k(biased, c.n_activated_experts)[1]
        weights = scores.gather(1, indices)
        if c.score_func == 'sigmoid':
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * c.route_scale, indices, scores, logits


def grouped_mm(x, w, offsets):
    """x [M, K] rows grouped by expert, w [E, K, N], offsets = end rows -> [M, N]."""
    # grouped_mm takes bf16 everywhere and fp32 on CPU, though not yet under torch.compile
    fp32_ok = x.device.type == 'cpu' and not torch.compiler.is_compiling()
    if hasattr(F, 'grouped_mm') and (x.dtype == torch.bfloat16 or x.dtype == torch.float32 and fp32_ok):
        return F.grouped_mm(x, w, offs=offsets)
    ends = offsets.tolist()  # a clear per-expert loop where grouped_mm is missing (syncs the host)
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip([0] + ends[:-1], ends))])


class MoE(nn.Module):
    """DeepSeekMoE: shared experts see every token; each token's top-k routed experts are run
    dropless as grouped matmuls over token copies sorted by expert."""
    grouped_mm = staticmethod(grouped_mm)  # the experts' matmul; fp8.use_fp8 sets an fp8 one per layer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.n_routed_experts, cfg.n_embd, cfg.moe_inter_dim
        self.gate = Gate(cfg)
        # stacked expert weights: every expert is in every step's graph, so one that got no
        # token gets a zero gradient rather than none (DDP waits for every gradient)
        self.w1 = nn.Parameter(torch.empty(E, D, I))
        self.w3 = nn.Parameter(torch.empty(E, D, I))
        self.w2 = nn.Parameter(torch.empty(E, I, D))
        self.shared_experts = MLP(D, cfg.n_shared_experts * I) if cfg.n_shared_experts else None

    def forward(self, x):
        c, (B, T, D) = self.cfg, x.shape
        # to the matmuls' dtype before the k copies: the permute, its backward and the gradients of
        # the copies then move half the bytes of the float32 residual stream (autocast would cast
        # every copy anyway, and the router's and shared experts' matmuls cast x the same way)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x = x.reshape(B * T, D).to(dtype)
        weights, indices, scores, logits = self.gate(x)
        x_sorted, offsets, row_map = ops.moe_permute(x, indices, c.n_routed_experts)
        y = ops.moe_unpermute(self.routed_experts(x_sorted, offsets), row_map, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        load = torch.diff(offsets, prepend=offsets.new_zeros(1)).float()  # tokens per expert
        aux = self.aux_losses(scores, logits, indices, B, T) if self.training else None
        return y.view(B, T, D), aux, load

    def routed_experts(self, x_sorted, offsets):
        """The routed experts' SwiGLU over rows sorted by expert; parallel.py's expert parallelism
        replaces it on a MoE layer with a dispatch to the ranks that own the experts."""
        if self.gate_up_in_one():
            w13 = torch.cat([self.w1, self.w3], -1).to(x_sorted.dtype)
            h1, h3 = self.grouped_mm(x_sorted, w13, offsets).chunk(2, -1)
        else:
            h1, h3 = self.expert_mm(x_sorted, 'w1', offsets), self.expert_mm(x_sorted, 'w3', offsets)
        return self.expert_mm(F.silu(h1) * h3, 'w2', offsets)

    def gate_up_in_one(self):
        """w1 and w3 as one grouped matmul: x is read once and its gradient comes out of one matmul,
        not two plus an add over the T*k rows. Only when training under torch.compile, where inductor
        writes the cat in the weights' cast (or, on train.py's bf16 working copies, a copy of a few
        MB) and fuses the halves' SwiGLU and the gradient's cat; eager runs strided kernels there
        (notes/training.md 8). A LoRA adapter on the experts (lora.py, which freezes them) keeps the
        per-weight seam."""
        return torch.compiler.is_compiling() and self.w1.requires_grad

    def expert_mm(self, x, name, offsets):
        """Rows sorted by expert times each expert's stacked weight `name` (w1, w2, w3); the seam
        where lora.py adds its per-expert low-rank term."""
        return self.grouped_mm(x, getattr(self, name).to(x.dtype), offsets)

    def aux_losses(self, scores, logits, indices, B, T):
        """V3's sequence-wise balance loss alpha * sum_i f_i P_i, and the router z-loss."""
        c, E, k = self.cfg, self.cfg.n_routed_experts, self.cfg.n_activated_experts
        probs = scores / scores.sum(-1, keepdim=True)
        chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0)
        f = chosen.view(B, T, E).sum(1) * (E / (k * T))
        p = probs.view(B, T, E).mean(1)
        balance = c.balance_loss_alpha * (f * p).sum(-1).mean()
        z = c.router_z_loss * torch.logsumexp(logits, -1).square().mean()
        return balance, z


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.attn = MLA(cfg) if cfg.attn == 'mla' else MHA(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.n_embd, cfg.dense_inter_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.recompute = False  # activation checkpointing: keep the input, recompute the rest in the backward

    def forward(self, x, cos, sin, pos=None, rows=None, attn_mask=None):
        """-> x, (balance loss, z loss) or None, expert load or None. Activation checkpointing is taken
        here: torch.compile of a block traces a checkpoint inside it, but runs a block wrapped in one eagerly."""
        if self.recompute:
            return torch.utils.checkpoint.checkpoint(self.body, x, cos, sin, pos, rows, attn_mask, use_reentrant=False)
        return self.body(x, cos, sin, pos, rows, attn_mask)

    def body(self, x, cos, sin, pos, rows, attn_mask):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, pos, rows, attn_mask))
        if isinstance(self.ffn, MLP):
            return x + self.drop(self.ffn(self.ffn_norm(x))), None, None
        y, aux, load = self.ffn(self.ffn_norm(x))
        return x + self.drop(y), aux, load


class MTP(nn.Module):
    """V3's multi-token prediction, depth 1: from the main model's hidden state at i and the
    embedding of token i+1, one more block predicts token i+2 through the shared head."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hnorm = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.enorm = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.proj = nn.Linear(2 * cfg.n_embd, cfg.n_embd, bias=False)
        self.block = Block(cfg, cfg.n_layer)
        self.norm = nn.RMSNorm(cfg.n_embd, eps=1e-6)

    def forward(self, h, e, cos, sin, pos=None, rows=None, attn_mask=None):
        """h: the main model's hidden states at positions i, e: embeddings of tokens i+1 -> the
        normed states that the shared head turns into predictions of tokens i+2. The block's residual
        stream is in h's dtype, as the main blocks' (float32 under autocast, where proj returns bf16): the
        same input dtype lets torch.compile run one compiled MoE block for all of them (train.py)."""
        x = self.proj(torch.cat([self.hnorm(h), self.enorm(e)], -1)).to(h.dtype)
        return self.norm(self.block(x, cos, sin, pos, rows, attn_mask)[0])


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=1e-6)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = MTP(cfg) if cfg.mtp_depth else None
        self.register_buffer('rope_cos', None, persistent=False)
        self.register_buffer('rope_sin', None, persistent=False)
        self.set_positions(cfg.block_size)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(('wo.weight', 'w2.weight')) or name.endswith('ffn.w2'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (MoE, Gate)):
            for p in module.parameters(recurse=False):
                torch.nn.init.normal_(p, mean=0.0, std=0.02)

    def set_positions(self, n):
        """RoPE tables for n positions: block_size, or more to decode past it with a sliding window."""
        cfg = self.cfg
        rope_dim = cfg.qk_rope_head_dim if cfg.attn == 'mla' else cfg.n_embd // cfg.n_head
        like = self.head.weight if self.rope_cos is None else self.rope_cos  # keep device and dtype
        self.rope_cos, self.rope_sin = (t.to(like) for t in rope_tables(rope_dim, n, cfg.rope_theta, cfg))

    def rope_at(self, pos, T):
        """cos, sin for T positions from 0 (pos None), or per sequence from pos [B, T]."""
        if pos is None:
            return self.rope_cos[:T, None], self.rope_sin[:T, None]
        return self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)

    def trunk(self, idx, pos=None, rows=None, attn_mask=None):
        """-> hidden states before the final norm [B, T, D], aux losses, expert loads. pos [B, T]
        when decoding over the caches (see MLA.forward), rows: the cache slots a prefill fills."""
        T = idx.size(1)
        if pos is None and T > self.rope_cos.size(0):
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        cos, sin = self.rope_at(pos, T)
        h, aux, loads = self.drop(self.embed(idx)), [], []
        for layer in self.layers:
            h, layer_aux, load = layer(h, cos, sin, pos, rows, attn_mask)
            if layer_aux is not None:
                aux.append(layer_aux)
            if load is not None:
                loads.append(load)
        return h, aux, loads

    def forward(self, idx, targets=None, start_pos=0, doc_ids=None, return_logits=True):
        """-> logits, loss, stats. With targets: logits at every position, the training loss, and
        stats = its parts plus the expert loads [n_moe_layers, E]; without: last-position logits.
        start_pos > 0 decodes over the caches (setup_cache) from that position. doc_ids [B, T]:
        packed examples; a token attends only to earlier tokens of its own document.
        return_logits=False (training loops): None in the logits' place. A compiled graph's output
        that gets no gradient still gets a zero one in its backward: a fill and an add over B*T*vocab."""
        B, T = idx.shape
        if start_pos + T > self.rope_cos.size(0):  # block_size, unless set_positions made more
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds block_size {self.cfg.block_size}")
        pos = (start_pos + torch.arange(T, device=idx.device)).expand(B, T) if start_pos else None
        attn_mask = self.attention_mask(doc_ids)
        h, aux, loads = self.trunk(idx, pos, attn_mask=attn_mask)
        if targets is None:
            return self.head(self.norm(h[:, [-1]])).float(), None, None
        # contiguous targets, as MTP's: the compiled loss (compile_regions) is guarded on their strides
        logits, ce = self.head_loss(self.norm(h), targets.contiguous(), return_logits)
        stats = {'ce': ce}
        zero = stats['ce'].new_zeros(())
        stats['balance'] = sum((a[0] for a in aux), zero)
        stats['z'] = sum((a[1] for a in aux), zero)
        stats['mtp'] = self.mtp_loss(h, idx, targets, attn_mask) if self.mtp is not None else zero
        loss = stats['ce'] + stats['balance'] + stats['z'] + self.cfg.mtp_lambda * stats['mtp']
        stats['load'] = torch.stack(loads) if loads else None
        return logits, loss, stats

    def head_loss(self, h, targets, return_logits=False):
        """The head's logits (None unless asked for) and their cross-entropy: a region of its own in
        compile_regions, so that the loss stays fused (eager, the logits' float copy and log-softmax
        are each written out in full: GBs a step for GPT-2's vocabulary)."""
        logits = self.head(h)
        return logits if return_logits else None, token_loss(logits, targets)

    def attention_mask(self, doc_ids):
        """doc_ids [B, T] of packed examples (or None) -> the mask that keeps them apart: a BlockMask
        for flex_attention (the window included), else SDPA's dense one (see cached_attention)."""
        if doc_ids is None:
            return None
        if flex_ok(self.cfg, doc_ids.device, self.training):
            return block_mask(doc_ids.size(1), self.cfg.attn_window, doc_ids.device, doc_ids)
        return doc_attention_mask(doc_ids)

    def mtp_loss(self, h, idx, targets, attn_mask=None):
        """Over all T positions, so that the MTP block runs the main blocks' shapes (no sliced copies,
        T stays a multiple of the kernels' tiles): the last position has no token i+1 to embed (it
        embeds token 0) and no target, and as attention is causal it changes no other position."""
        h = self.mtp(h, self.embed(idx.roll(-1, 1)), *self.rope_at(None, idx.size(1)), attn_mask=attn_mask)
        return self.head_loss(h, F.pad(targets[:, 1:], (0, 1), value=-1))[1]

    # -------------------------------------------------------------------------
    # balancing, counting, optimizing

    def blocks(self):
        """Every Block the model runs, the MTP block last."""
        return [*self.layers, *([self.mtp.block] if self.mtp is not None else [])]

    def compile_regions(self, mode=None):
        """Regional compilation: torch.compile each block and the head's loss in place (the state_dict
        keys stay), the rest runs eagerly. All blocks run Block.forward and their parameters are inputs
        of its graphs, not guarded constants, so dynamo compiles each kind once (dense, MoE; training,
        eval) for every layer. Under a CUDA-graph mode each region's forward and backward are graphs."""
        for block in self.blocks():
            block.compile(mode=mode)
        self.head_loss = torch.compile(self.head_loss, mode=mode)
        if mode in ('reduce-overhead', 'max-autotune'):
            # each forward starts a new step of the graphs: without it an eval forward (no backward
            # pending) would start one at every block, invalidating the previous block's output
            self.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())

    def moe_layers(self):
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    @torch.no_grad()
    def update_router_biases(self, load):
        """After an optimizer step: each expert's bias moves by gamma towards its fair share of the
        step's load [n_moe_layers, E] (all-reduce it over ranks first, so biases stay identical)."""
        step = self.cfg.bias_update_speed * torch.sign(load.mean(-1, keepdim=True) - load)  # all layers at once
        torch._foreach_add_([moe.gate.bias for moe in self.moe_layers()], list(step.unbind()))

    def num_params(self, active=False):
        """All parameters, or those one token uses: routed experts count k of E. MTP is excluded:
        it is a training aid, unused at inference."""
        n = sum(p.numel() for n_, p in self.named_parameters() if not n_.startswith('mtp.'))
        if active:
            c = self.cfg
            for moe in self.moe_layers():
                routed = moe.w1.numel() + moe.w2.numel() + moe.w3.numel()
                n -= routed * (c.n_routed_experts - c.n_activated_experts) // c.n_routed_experts
        return n

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, muon_lr=0.0, muon_momentum=0.95):
        """AdamW; with muon_lr > 0, Muon (muon.py) for the hidden matrices, each routed expert's on its
        own, and AdamW for the rest: embeddings, head, router, norms. Muon's group has lr_scale
        (muon_lr / learning_rate): the schedule sets each group's lr to the scheduled lr times it."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        not_hidden = ('embed.weight', 'head.weight', 'gate.weight')  # inputs, outputs and the router
        hidden = [p for n, p in named if muon_lr and p.dim() >= 2 and not n.endswith(not_hidden)]
        in_muon = {id(p) for p in hidden}
        rest = [p for _, p in named if id(p) not in in_muon]
        decay = [p for p in rest if p.dim() >= 2]  # matrices and embeddings; not norms or biases
        groups = [{'params': decay, 'weight_decay': weight_decay},
                  {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}]
        fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters and device_type == 'cuda'
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)
        if not hidden:
            return adamw
        muon = Muon([{'params': hidden, 'lr_scale': muon_lr / learning_rate}], lr=muon_lr,
                    weight_decay=weight_decay, momentum=muon_momentum)
        return Optimizers(adamw=adamw, muon=muon)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per active weight plus attention's two matmuls over the
        sequence (fwd + bwd), counted over the full block as nanoGPT/PaLM do."""
        c = self.cfg
        qk, v = c.attn_head_dims
        return 6 * self.num_params(active=True) + 6 * c.n_layer * c.n_head * (qk + v) * c.block_size

    def estimate_mfu(self, tokens_per_sec, device):
        """Model FLOPs utilization against the running GPU's dense bf16 peak; None where unknown."""
        peak = bf16_peak_flops(device)
        return None if peak is None else self.flops_per_token() * tokens_per_sec / peak

    # -------------------------------------------------------------------------
    # inference

    def attentions(self):
        """Every attention module, the MTP block's last: each gets a cache for decoding."""
        return [block.attn for block in self.blocks()]

    def setup_cache(self, batch_size, mode='latent', dtype=None, device=None, length=None):
        """mode 'latent' caches c_kv and k_pe (absorbed attention), 'naive' per-head K and V; length
        entries per sequence (default block_size; fewer make a ring buffer for a sliding window)."""
        assert mode in ('latent', 'naive') and (mode == 'naive' or self.cfg.attn == 'mla')
        p = self.head.weight
        for attn in self.attentions():
            attn.setup_cache(batch_size, length or self.cfg.block_size, mode, dtype or p.dtype, device or p.device)

    def clear_cache(self):
        for attn in self.attentions():
            attn.cache, attn.latent = None, False

    def cache_values_per_token(self):
        return sum(t[0, 0].numel() for layer in self.layers if layer.attn.cache for t in layer.attn.cache)


def token_loss(logits, targets):
    """Mean cross-entropy over the targets (-1: not scored). The logits stay in their own (autocast)
    dtype until the loss: a float copy, returned from a compiled graph, would be written out in full
    (3.3 GB a step for GPT-2's vocabulary at train_scale's batch)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def doc_attention_mask(doc_ids):
    """doc_ids [B, T] -> [B, 1, T, T] block-diagonal causal mask. RoPE scores depend only on
    relative positions, so a packed document sees exactly what it would see alone."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def bf16_peak_flops(device):
    """Dense bf16 tensor-core peak of known GPUs (datasheet figures), by device name."""
    if torch.device(device).type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (('H100', 989e12), ('H200', 989e12), ('H800', 989e12), ('B200', 2250e12),
                       ('A100', 312e12), ('A10G', 70e12), ('L4', 121e12), ('4090', 165e12), ('3090', 71e12)):
        if key in name:
            return flops
    return None
