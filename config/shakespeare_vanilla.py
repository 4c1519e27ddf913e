# The vanilla baseline of shakespeare_ponder.py: the same model, data and recipe without latent thoughts
# (same init and embedding scale, so the only difference is the thinking).
#   python train.py config/shakespeare_vanilla.py
exec(open('config/shakespeare_ponder.py').read())

out_dir = 'out-shakespeare-vanilla'
wandb_run_name = 'shakespeare-vanilla'
n_thoughts = 0
