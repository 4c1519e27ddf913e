# The Loop baseline of the papers on pythia-70m, with the recipe of pythia70m_ponder.py: the whole layer stack run
# K+1 = 2 times with the same weights (the last layer's residual stream straight back into the first), the final
# LayerNorm once at the end; embeddings always scaled by sqrt(2.5 H), as the official Loop code does. Two trunk
# passes per token, as PonderLM (v1) N=1: the depth without the fed-back prediction.
#   python train.py config/pythia70m_loop.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-loop'
wandb_run_name = 'pythia70m-loop'
n_thoughts = 0
n_loop = 1
# two passes of 1 slot per token: ~15 GB for a micro-batch of 8 (the plan, not yet measured on a GPU)
