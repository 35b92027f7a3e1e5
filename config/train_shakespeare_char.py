# Character-level Shakespeare on one GPU: nanoGPT's baby GPT budget (<= 10.65M active parameters
# per token) spent on MLA + DeepSeekMoE (7 layers, 16 fine-grained experts, top-2, 1 shared): 35.1M
# parameters in all, 10.33M active, overfit 1M characters fast. A sweep (3 seeds a variant) picked
# weight decay 5.0, dropout 0.15 and 7 layers at batch 32. Batch 128 for 600 steps at 2.7x the
# learning rate: at batch 32 this model is too small to keep an H100 busy (1.0M tokens/s there
# against 1.58M here); the best val loss is ~0.004-0.008 higher on average (notes/training.md 9, 10).
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
eval_interval = 50
eval_iters = 50
log_interval = 50
always_save_checkpoint = False  # it overfits: keep the best

batch_size = 128
block_size = 256
n_layer = 7
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
dropout = 0.15
mtp_depth = 1  # V3's multi-token prediction: no extra active parameters, and sample.py drafts with it

learning_rate = 1.6e-3
weight_decay = 5.0
max_iters = 600
lr_decay_iters = 600
min_lr = 1.6e-4
beta2 = 0.99
warmup_iters = 50
