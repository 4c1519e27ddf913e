# A tiny PonderLM-2 (K=1) on Tiny Shakespeare that trains on a laptop CPU in minutes.
#   python train.py config/shakespeare_ponder.py     # prepares data/shakespeare-bpe512 first, if missing, as
#     python prepare_data.py --dataset=shakespeare --tokenizer=bpe:512 would (offline: --input=PATH)
#   python train.py config/shakespeare_vanilla.py                       # the same without thoughts, to compare
# A 512-id BPE trained on the train split keeps the embeddings small (0.13M parameters against the trunk's
# 1.19M), so what the model learns depends on the trunk's compute per token, which thoughts change: the regime
# where the comparison means something (with Pythia's 50K vocabulary the embeddings are 92% of such a model).
# 300 iterations of 16 x 128 tokens (~1.2 epochs). With K=1 and R = 2..4 every token costs ~9 trunk passes,
# so this is several times slower per iteration than shakespeare_vanilla.py. On a shared or busy machine
# OMP_NUM_THREADS=1 can be several times faster than the default (threads waiting for each other's cores).

out_dir = 'out-shakespeare-ponder'
data_dir = 'data/shakespeare-bpe512'
dataset = 'shakespeare'  # the first run prepares data_dir (downloads the text, or --input=PATH: a local copy)
tokenizer = 'bpe:512'
wandb_run_name = 'shakespeare-ponder'
eval_interval = 50
eval_iters = 8
log_interval = 10

model = 'pythia-14m'     # 6 layers, 4 heads, 128 wide
vocab_size = 512
block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 300

n_thoughts = 1
n_jacobi = 3
jacobi_train_range = (2, 4)

learning_rate = 2e-3     # a small model on little data takes a higher peak than the papers' 1e-3
warmup_iters = 10
min_lr_ratio = 0.1
weight_decay = 0.1

device = 'cpu'
dtype = 'auto'           # bf16 autocast where the CPU has native bf16 matmul, else fp32
compile = False
