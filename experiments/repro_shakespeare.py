# The small CPU reproduction (README "Results"): one trunk size, the same tokens, the same fair init
# (weight_init 'small', scaled embeddings) for every method. This file is the vanilla run; experiments/repro.py
# adds --n_thoughts=1 | --n_thoughts=2 | --n_ponder=3 | --n_layer=12 (vanilla with 2x the non-embedding
# params), an absolute --data_dir and one out_dir per run. By hand, from the repository root, e.g.:
#   python train.py experiments/repro_shakespeare.py --n_thoughts=1 --out_dir=out-repro/ponderlm2-k1
# 200 iterations of 4 x 256 tokens = 205K tokens, about 2/3 of an epoch of Tiny Shakespeare (Pythia tokens).

out_dir = 'out-repro/vanilla'
data_dir = 'data/shakespeare'  # from the working directory: repro.py passes its own, absolute
wandb_run_name = 'repro-vanilla'
eval_interval = 25
eval_iters = 8           # 8 x 4 blocks = 8K val tokens, the same blocks at every evaluation
log_interval = 5
always_save_checkpoint = True

model = 'pythia-14m'     # 6 layers, 4 heads, 128 wide: 1.2M non-embedding parameters
block_size = 256
batch_size = 4
gradient_accumulation_steps = 1
max_iters = 200

n_thoughts = 0
n_jacobi = 3
jacobi_train_range = (2, 4)
n_ponder = 0
scale_embeds = True
weight_init = 'small'

learning_rate = 2e-3
warmup_iters = 10
min_lr_ratio = 0.1
weight_decay = 0.1

device = 'cpu'
dtype = 'float32'
compile = False
seed = 1337
