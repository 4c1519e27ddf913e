# The papers' stock baseline: vanilla pythia-70m with the Hugging Face / Pythia init (normal(0, 0.02)) and
# unscaled embeddings, otherwise the recipe of pythia70m_ponder.py.
#   python train.py config/pythia70m_vanilla_hfinit.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-vanilla-hfinit'
wandb_run_name = 'pythia70m-vanilla-hfinit'
n_thoughts = 0
weight_init = 'normal'
scale_embeds = False
