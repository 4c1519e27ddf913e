# PonderLM-2 with K=1 latent thought per token on pythia-70m, one epoch of MiniPile: the headline run.
#   python prepare_data.py                                  # data/minipile (or --prepare=True below)
#   python train.py config/pythia70m_ponder.py              # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia70m_ponder.py
# The papers' recipe: global batch 128 sequences x 2048 tokens, AdamW lr 1e-3 (betas 0.9/0.95, weight decay
# 0.01), 1% warmup then cosine to 0.1x, gradient clipping at 1.0, bf16; R in {2,3,4} Jacobi passes in
# training and 3 in evaluation. The other pythia*_*.py configs change only what their names say.

out_dir = 'out-pythia70m-ponder'
wandb_run_name = 'pythia70m-ponder'
data_dir = 'data/minipile'
dataset = 'minipile'     # a missing data_dir is prepared here with --prepare=True (GBs to download), else an error
tokenizer = 'pythia'
eval_interval = 500
eval_iters = 40

model = 'pythia-70m'
block_size = 2048
n_thoughts = 1
n_jacobi = 3
jacobi_train_range = (2, 4)
n_ponder = 0
weight_init = 'small'
scale_embeds = True

# 128 sequences per iteration: 8 per micro-batch x 16 micro-batches, split over the GPUs (with 8 GPUs each
# does 2). By our estimate (not yet measured on a GPU) a micro-batch of 8 needs ~30 GB with K=1 (R=4 keeps 1 + 5 x 2 = 11 passes' activations per token).
batch_size = 8
gradient_accumulation_steps = 16
num_epochs = 1.0
max_iters = 0

learning_rate = 1e-3
warmup_ratio = 0.01
min_lr_ratio = 0.1
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

dtype = 'auto'      # bf16 autocast on CUDA
compile = True
