# The Pause baseline of shakespeare_ponder.py: the same model, data and recipe with K=1 pause slot after every token
# instead of a latent thought (2 slots per token in one trunk pass, as K=1's final pass, but nothing fed back).
#   python train.py config/shakespeare_pause.py
# The pause vector is an embedding row that no token uses: the 512-id BPE uses every row of a 512-row embedding, so
# vocab_size is padded by 8 rows (never a target: their logits only learn to stay low) and the pause is the last.
exec(open('config/shakespeare_ponder.py').read())

out_dir = 'out-shakespeare-pause'
wandb_run_name = 'shakespeare-pause'
n_thoughts = 0
n_pause = 1
vocab_size = 520
pause_token_id = 519
