# PonderLM-2 (K=1) on pythia-160m, the recipe of pythia70m_ponder.py with the papers' lr for this size.
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia160m_ponder.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia160m-ponder'
wandb_run_name = 'pythia160m-ponder'
model = 'pythia-160m'
learning_rate = 6e-4
# ~8 GB (estimated, not measured) of activations per sequence with K=1 and R up to 4: 4 per micro-batch fits an 80 GB GPU with room;
# still 128 sequences per iteration
batch_size = 4
gradient_accumulation_steps = 32
eval_iters = 80  # 320 val sequences per evaluation, as with batch 8 x 40
