# PonderLM-2 with K=2 latent thoughts per token on pythia-70m, the recipe of pythia70m_ponder.py.
#   python train.py config/pythia70m_ponder_k2.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-ponder-k2'
wandb_run_name = 'pythia70m-ponder-k2'
n_thoughts = 2
# 3 slots per token instead of 2: half the micro-batch of K=1 (~25 GB, estimated), twice the accumulation;
# eval_iters doubled so that every evaluation reads the same 320 val sequences as the K=1 run
batch_size = 4
gradient_accumulation_steps = 32
eval_iters = 80  # 320 val sequences per evaluation, as with batch 8 x 40
