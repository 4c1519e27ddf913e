# PonderLM-2 (K=1) on pythia-1.4b, the recipe of pythia70m_ponder.py with the papers' lr for this size.
#   torchrun --standalone --nproc_per_node=8 train.py config/pythia1.4b_ponder.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia1.4b-ponder'
wandb_run_name = 'pythia1.4b-ponder'
model = 'pythia-1.4b'
learning_rate = 2e-4
# ~40 GB (estimated, not measured) of activations per sequence with K=1 and R up to 4, plus ~21 GB of fp32 weights, gradients and
# AdamW state: one sequence per micro-batch on an 80 GB GPU; still 128 sequences per iteration
batch_size = 1
gradient_accumulation_steps = 128
eval_iters = 320  # 320 val sequences per evaluation, as with batch 8 x 40
