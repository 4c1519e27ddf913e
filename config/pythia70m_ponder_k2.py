# PonderLM-2 with K=2 latent thoughts per token on pythia-70m, the recipe of pythia70m_ponder.py.
#   python train.py config/pythia70m_ponder_k2.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-ponder-k2'
wandb_run_name = 'pythia70m-ponder-k2'
n_thoughts = 2
# 3 slots per token instead of 2: half the micro-batch of K=1 (~25 GB), twice the accumulation
batch_size = 4
gradient_accumulation_steps = 32
