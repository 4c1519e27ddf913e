# PonderLM-2 (K=1) on pythia-410m, the recipe of pythia70m_ponder.py with the papers' lr for this size.
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia410m_ponder.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia410m-ponder'
wandb_run_name = 'pythia410m-ponder'
model = 'pythia-410m'
learning_rate = 3e-4
# ~20 GB (estimated, not measured) of activations per sequence with K=1 and R up to 4: 2 per micro-batch on an 80 GB GPU;
# still 128 sequences per iteration
batch_size = 2
gradient_accumulation_steps = 64
eval_iters = 160  # 320 val sequences per evaluation, as with batch 8 x 40
