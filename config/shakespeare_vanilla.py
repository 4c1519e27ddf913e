# The vanilla baseline of shakespeare_ponder.py: the same model, data and recipe without latent thoughts
# (same init, data and schedule: the difference is the thinking, and the embedding scale that goes with it).
#   python train.py config/shakespeare_vanilla.py
exec(open('config/shakespeare_ponder.py').read())

out_dir = 'out-shakespeare-vanilla'
wandb_run_name = 'shakespeare-vanilla'
n_thoughts = 0
