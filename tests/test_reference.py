"""Our Transformer against Hugging Face transformers' DeepSeek-V3 and -V2 (which follow DeepSeek's
reference inference code): our weights exported by hf.py and loaded by AutoModelForCausalLM give the
same fp32 logits."""
import pytest
import torch

import hf
from model import ModelConfig, Transformer

transformers = pytest.importorskip('transformers')

B, T = 2, 16
SMALL = dict(vocab_size=128, block_size=T, n_layer=3, n_embd=64, n_head=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_dense_layers=1,
             dense_inter_dim=128, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
             moe_inter_dim=32, route_scale=2.5, n_expert_groups=4, n_limited_groups=2)
# YaRN as DeepSeek-V2 configures it, stretched over a tiny context: 4 positions pretrained, 16 used
YARN = dict(rope_scaling_factor=4.0, rope_original_max_position=4, rope_mscale=0.707, rope_mscale_all_dim=0.707)


def perturbed_model(**overrides):
    """A model whose norms, router and (V3) selection bias are far from their init, so that a
    misplaced norm or a wrong routing rule shows in the logits."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith('gate.weight'):  # spread the router scores so tokens disagree on experts
                p.normal_(0.0, 0.3)
        for moe in model.moe_layers():
            if model.cfg.score_func == 'sigmoid':
                moe.gate.bias.normal_(0.0, 0.1)
    return model


def hf_model(ours, hf_dir):
    hf.export(ours, None, hf_dir)
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation='eager').eval()


@pytest.mark.parametrize('yarn', [False, True])
@pytest.mark.parametrize('q_lora_rank', [0, 24])
@pytest.mark.parametrize('score_func', ['sigmoid', 'softmax'])  # DeepSeek-V3 (with MTP), DeepSeek-V2
def test_logits_match_hf(score_func, q_lora_rank, yarn, tmp_path):
    ours = perturbed_model(q_lora_rank=q_lora_rank, score_func=score_func, mtp_depth=score_func == 'sigmoid',
                           **(YARN if yarn else {}))
    ref_model = hf_model(ours, tmp_path)
    idx = torch.randint(0, ours.cfg.vocab_size, (B, T))
    with torch.no_grad():
        logits, _, stats = ours(idx, targets=idx)  # with targets: logits at every position
        ref = ref_model(idx).logits
    err = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"max relative error {err:.2e}"
    assert (stats['load'] > 0).all(), "every expert should get tokens, or routing went untested"
    with torch.no_grad():  # and what is under test changes the logits, well beyond the tolerance
        if score_func == 'sigmoid':  # the bias changes some token's experts
            for moe in ours.moe_layers():
                moe.gate.bias.zero_()
        if yarn:  # the scaled frequencies and softmax scale matter
            ours = perturbed_model(q_lora_rank=q_lora_rank, score_func=score_func)
        if score_func == 'sigmoid' or yarn:
            assert (ours(idx, targets=idx)[0] - ref).abs().max() > 1e-4 * ref.abs().max()
