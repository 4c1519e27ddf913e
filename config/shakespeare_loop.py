# The Loop baseline of shakespeare_ponder.py: the same model, data and recipe with the layer stack run twice (K=1,
# the same weights) instead of a latent thought.
#   python train.py config/shakespeare_loop.py
exec(open('config/shakespeare_ponder.py').read())

out_dir = 'out-shakespeare-loop'
wandb_run_name = 'shakespeare-loop'
n_thoughts = 0
n_loop = 1
