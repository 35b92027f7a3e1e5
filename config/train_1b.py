# A 1.08B-parameter MLA + MoE model (171M active per token) that trains on one 24 GiB GPU:
# config/train_scale.py's shape with 64 routed experts of width 448 (the experts hold 0.97B of the
# parameters). Memory: AdamW keeps fp32 weights, gradients and two moments, 16 bytes a parameter =
# 16.1 GiB; activation checkpointing keeps one block's activations at a time, and micro-batches of
# 4 x 1024 tokens hold the GPT-2-vocabulary logits to ~3 GiB (8 x 1024 would come within ~1 GiB of
# the cap). Under --memory_limit_gib=24 on an H100 (bench_finetune.py part C, eager): 19.6 GiB peak,
# 21k tokens/s. The data is far too small for the loss to mean anything.
out_dir = 'out-1b'
dataset = 'shakespeare'
eval_interval = 10000
eval_iters = 2
log_interval = 5
max_iters = 60
warmup_iters = 10
lr_decay_iters = 60
learning_rate = 3e-4
gradient_accumulation_steps = 8   # 32k tokens per step
batch_size = 4
block_size = 1024
activation_checkpointing = True

n_layer = 12
n_embd = 1024
n_head = 16
q_lora_rank = 384
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_dense_layers = 1
dense_inter_dim = 2816
n_routed_experts = 64
n_shared_experts = 1
n_activated_experts = 4
moe_inter_dim = 448
score_func = 'sigmoid'
n_expert_groups = 4
n_limited_groups = 2
tie_embeddings = True
