# PonderLM (v1): 3 pondering steps per token on pythia-70m (each adds the probability-weighted embedding of
# the previous pass's prediction to the input), with the recipe of pythia70m_ponder.py.
#   python train.py config/pythia70m_ponderlm1.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-ponderlm1'
wandb_run_name = 'pythia70m-ponderlm1'
n_thoughts = 0
n_ponder = 3
