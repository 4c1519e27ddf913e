# The Pause baseline of the papers on pythia-70m, with the recipe of pythia70m_ponder.py: K=1 pause slot after every
# token (x1 P x2 P ...), the one pause vector being the embedding row pause_token_id, and the output at the pause
# predicting the next token. The trunk sees 2 slots per token, as PonderLM-2 K=1's final pass does, but with no
# thought fed back: the extra compute without the latent thought.
#   python train.py config/pythia70m_pause.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-pause'
wandb_run_name = 'pythia70m-pause'
n_thoughts = 0
n_pause = 1
pause_token_id = 50288  # the official one: a row of the 50304 that pads Pythia's 50277 ids, which no text produces
# one pass over 2 slots per token: ~15 GB for a micro-batch of 8 (the plan, not yet measured on a GPU)
