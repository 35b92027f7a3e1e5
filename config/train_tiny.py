# A small MLA + MoE model on GPT-2-tokenized Shakespeare that trains in under two minutes on a
# 2-core CPU (seconds on a GPU) and already writes speaker names, line breaks and English words.
# sample.py reads its out_dir by default.
out_dir = 'out'
dataset = 'shakespeare'
eval_interval = 75
eval_iters = 5
log_interval = 10
max_iters = 150
lr_decay_iters = 150
warmup_iters = 20
learning_rate = 2e-3
min_lr = 2e-4
batch_size = 16
block_size = 64
dropout = 0.0

n_layer = 4
n_embd = 128
n_head = 4
kv_lora_rank = 64
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
n_dense_layers = 1
dense_inter_dim = 384
n_routed_experts = 8
n_shared_experts = 1
n_activated_experts = 2
moe_inter_dim = 128
tie_embeddings = True
