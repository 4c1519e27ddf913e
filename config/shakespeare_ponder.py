# A tiny PonderLM-2 (K=1) on Tiny Shakespeare that trains on a laptop CPU in a few minutes.
#   python prepare_data.py --dataset=shakespeare
#   python train.py config/shakespeare_ponder.py
# The Pythia tokenizer gives ~300K train tokens and a 50K vocabulary, so the embeddings dominate the
# parameters (13M of 13.8M): the trunk is small (4 layers, 128 wide) and the run short, 200 iterations of
# 8 x 128 tokens (~0.7 epoch). With K=1 and R = 2..4 every token costs ~9 trunk passes, so this is ~3x
# slower per iteration than shakespeare_vanilla.py. On a shared or busy machine OMP_NUM_THREADS=1 can be
# several times faster than the default (threads waiting for each other's cores).

out_dir = 'out-shakespeare-ponder'
data_dir = 'data/shakespeare'
wandb_run_name = 'shakespeare-ponder'
eval_interval = 50
eval_iters = 5
log_interval = 5

model = ''
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 200

n_thoughts = 1
n_jacobi = 3
jacobi_train_range = (2, 4)

learning_rate = 2e-3     # a small model on little data takes a higher peak than the papers' 1e-3
warmup_iters = 10
min_lr_ratio = 0.1
weight_decay = 0.1

device = 'cpu'
dtype = 'float32'
compile = False
