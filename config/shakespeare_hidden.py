# The hidden-state feedback baseline of shakespeare_ponder.py: the same model, data and recipe with N=1 step that adds
# the trunk's last hidden state to the input (two trunk passes per token) instead of a latent thought.
#   python train.py config/shakespeare_hidden.py
exec(open('config/shakespeare_ponder.py').read())

out_dir = 'out-shakespeare-hidden'
wandb_run_name = 'shakespeare-hidden'
n_thoughts = 0
n_hidden = 1
