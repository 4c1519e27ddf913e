# The CPU experiment of the README "Results": do latent thoughts pay off when the trunk, not the embeddings, is
# most of the model? Tiny Shakespeare with a 512-id byte-level BPE trained on its train split
# (python prepare_data.py --dataset=shakespeare --tokenizer=bpe:512 --out_dir=data/shakespeare-bpe512), the
# pythia-14m trunk (6 layers, 4 heads, 128 wide: 1.19M non-embedding parameters against 0.13M embedding ones),
# the same tokens and the same fair init (weight_init 'small', scaled embeddings) for every method.
# This file is the vanilla run; experiments/repro.py adds each run's method (--n_thoughts=1, --n_layer=12, ...),
# its seed, an absolute --data_dir and one out_dir per run. By hand, from the repository root, e.g.:
#   python train.py experiments/repro_shakespeare.py --n_thoughts=1 --out_dir=out-repro/ponderlm2-k1-s1337
# 160 iterations of 16 x 128 tokens = 328K tokens, about 0.63 epoch of the 517K train tokens.

out_dir = 'out-repro/vanilla'
data_dir = 'data/shakespeare-bpe512'  # from the working directory: repro.py passes its own, absolute
wandb_run_name = 'repro-vanilla'
eval_interval = 20
eval_iters = 8           # 8 x 16 blocks = 16K of the 59K val tokens, the same blocks at every evaluation
log_interval = 10
always_save_checkpoint = True

model = 'pythia-14m'     # 6 layers, 4 heads, 128 wide
vocab_size = 512
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 160

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
dtype = 'auto'           # bf16 autocast on CPUs with native bf16 matmul (AVX512-BF16, AMX), else fp32
compile = False
seed = 1337
