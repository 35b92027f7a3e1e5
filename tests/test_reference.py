"""Our Transformer against Hugging Face transformers' DeepSeek-V3 and -V2 (which follow DeepSeek's
reference inference code): same configuration, same weights -> the same fp32 logits."""
import pytest
import torch

from model import ModelConfig, Transformer

transformers = pytest.importorskip('transformers')

B, T = 2, 16
SMALL = dict(vocab_size=128, block_size=T, n_layer=3, n_embd=64, n_head=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_dense_layers=1,
             dense_inter_dim=128, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
             moe_inter_dim=32, route_scale=2.5, n_expert_groups=4, n_limited_groups=2)


def hf_config(c: ModelConfig):
    """Our config in HF's names. V3 = sigmoid gating with the selection bias and top-k weights
    renormalised; V2 = softmax gating, group-limited greedy, no renormalisation."""
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.dense_inter_dim,
                  moe_intermediate_size=c.moe_inter_dim, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                  q_lora_rank=c.q_lora_rank or None,  # no query compression: ours 0, HF None
                  kv_lora_rank=c.kv_lora_rank,
                  qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
                  v_head_dim=c.v_head_dim, n_routed_experts=c.n_routed_experts,
                  n_shared_experts=c.n_shared_experts, num_experts_per_tok=c.n_activated_experts,
                  routed_scaling_factor=c.route_scale, n_group=c.n_expert_groups,
                  topk_group=c.n_limited_groups, first_k_dense_replace=c.n_dense_layers,
                  max_position_embeddings=c.block_size, rms_norm_eps=1e-6, tie_word_embeddings=c.tie_embeddings,
                  rope_parameters={'rope_type': 'default', 'rope_theta': c.rope_theta},  # no YaRN, so no mscale
                  attention_dropout=0.0, attn_implementation='eager', experts_implementation='eager')
    if c.score_func == 'sigmoid':
        # rope_interleave: rotate (x0, x1), (x2, x3), ... pairs as ours and DeepSeek's complex form do
        # (HF then lays the rotated pairs out de-interleaved, in q and k alike, so q.k is the same)
        return transformers.DeepseekV3Config(**common, norm_topk_prob=True, rope_interleave=True, num_mtp_layers=0)
    return transformers.DeepseekV2Config(**common, norm_topk_prob=False, topk_method='group_limited_greedy')


def hf_state_dict(ours: Transformer):
    """Our weights under HF's names and layouts."""
    top = {'embed.weight': 'model.embed_tokens.weight', 'norm.weight': 'model.norm.weight',
           'head.weight': 'lm_head.weight'}
    in_layer = [('attn_norm.', 'input_layernorm.'), ('ffn_norm.', 'post_attention_layernorm.'),
                ('attn.', 'self_attn.'), ('ffn.', 'mlp.'), ('wq.', 'q_proj.'), ('wq_a.', 'q_a_proj.'),
                ('q_norm.', 'q_a_layernorm.'), ('wq_b.', 'q_b_proj.'), ('wkv_a.', 'kv_a_proj_with_mqa.'),
                ('kv_norm.', 'kv_a_layernorm.'), ('wkv_b.', 'kv_b_proj.'), ('wo.', 'o_proj.'),
                ('w1.', 'gate_proj.'), ('w3.', 'up_proj.'), ('w2.', 'down_proj.'),
                ('gate.bias', 'gate.e_score_correction_bias')]
    sd = {}
    for name, t in ours.state_dict().items():
        if name in top:
            sd[top[name]] = t
            continue
        if name.endswith(('ffn.w1', 'ffn.w3', 'ffn.w2')):
            continue  # stacked routed experts, below
        if name.endswith('gate.bias') and ours.cfg.score_func == 'softmax':
            continue  # V2 has no selection bias (ours stays zero)
        name = '.' + name  # so that each rename matches whole dotted components only
        for a, b in in_layer:
            name = name.replace('.' + a, '.' + b)
        sd['model' + name] = t
    for i, layer in enumerate(ours.layers):
        if ours.cfg.is_moe_layer(i):
            # ours: x @ w[e] with w1, w3 [E, D, I] and w2 [E, I, D]; HF: F.linear(x, w[e]) with
            # gate_up_proj = [gate; up] as [E, 2I, D] and down_proj [E, D, I]
            sd[f'model.layers.{i}.mlp.experts.gate_up_proj'] = torch.cat([layer.ffn.w1.mT, layer.ffn.w3.mT], 1)
            sd[f'model.layers.{i}.mlp.experts.down_proj'] = layer.ffn.w2.mT
    return sd


@pytest.mark.parametrize('q_lora_rank', [0, 24])
@pytest.mark.parametrize('score_func', ['sigmoid', 'softmax'])  # DeepSeek-V3, DeepSeek-V2
def test_logits_match_hf(score_func, q_lora_rank):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**SMALL, q_lora_rank=q_lora_rank, score_func=score_func)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if 'norm' in name:  # norms start at 1: perturb them so a misplaced one shows
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith('gate.weight'):  # spread the router scores so tokens disagree on experts
                p.normal_(0.0, 0.3)
        for moe in ours.moe_layers():  # V3's selection bias, large enough to change the choice
            if score_func == 'sigmoid':
                moe.gate.bias.normal_(0.0, 0.1)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(ours.cfg)).eval()
    hf.load_state_dict(hf_state_dict(ours), strict=True)

    idx = torch.randint(0, ours.cfg.vocab_size, (B, T))
    with torch.no_grad():
        logits, _, stats = ours(idx, targets=idx)  # with targets: logits at every position
        ref = hf(idx).logits
    err = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"max relative error {err:.2e}"
    assert (stats['load'] > 0).all(), "every expert should get tokens, or routing went untested"
    if score_func == 'sigmoid':  # and the bias really changed some token's experts
        with torch.no_grad():
            for moe in ours.moe_layers():
                moe.gate.bias.zero_()
            assert (ours(idx, targets=idx)[0] - ref).abs().max() > 1e-3 * ref.abs().max()
