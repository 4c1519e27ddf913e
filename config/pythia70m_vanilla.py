# The fair baseline of pythia70m_ponder.py: the same recipe, weight_init ('small') and embedding scale
# (sqrt(H) instead of PonderLM-2's sqrt(2.5 H)), no latent thoughts.
#   python train.py config/pythia70m_vanilla.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-vanilla'
wandb_run_name = 'pythia70m-vanilla'
n_thoughts = 0
