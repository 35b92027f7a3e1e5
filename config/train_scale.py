# A larger MLA + MoE model on GPT-2 Shakespeare that keeps an H100/H200 busy: what DDP scaling
# is measured with (README). A short run; the data is far too small for it to mean anything else.
out_dir = 'out-scale'
dataset = 'shakespeare'
eval_interval = 10000
eval_iters = 2
log_interval = 5
max_iters = 60
warmup_iters = 10
lr_decay_iters = 60
learning_rate = 3e-4
gradient_accumulation_steps = 8   # over all processes: 2 GPUs run 4 micro-steps each
batch_size = 16
block_size = 1024

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
n_routed_experts = 32
n_shared_experts = 1
n_activated_experts = 4
moe_inter_dim = 512
score_func = 'sigmoid'
n_expert_groups = 4
n_limited_groups = 2
tie_embeddings = True
