# GPT-2-tokenized Shakespeare on one GPU, with the active-parameter budget of nanoGPT's baby GPT on
# the same data (29.9M with the tied 50304 x 384 embedding). 300k tokens overfit within a few hundred
# steps, so it is short, regularised, and keeps the best checkpoint.
out_dir = 'out-shakespeare'
dataset = 'shakespeare'
eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

batch_size = 64
block_size = 256
n_layer = 6
n_embd = 384
n_head = 6
kv_lora_rank = 128
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_dense_layers = 1
dense_inter_dim = 1024
n_routed_experts = 16
n_shared_experts = 1
n_activated_experts = 2
moe_inter_dim = 256
tie_embeddings = True
dropout = 0.2
mtp_depth = 1

learning_rate = 6e-4
max_iters = 300
lr_decay_iters = 300
min_lr = 6e-5
warmup_iters = 50
