# The hidden-state feedback baseline of the papers on pythia-70m (the official GPT-NeoX "ponderlm" patch method),
# with the recipe of pythia70m_ponder.py: N=1 step c = E[x] + f(E[x]), f the trunk up to its final LayerNorm, then the
# pass whose logits are read; the embeddings are never scaled. Two trunk passes per token, as PonderLM (v1) N=1, with
# the raw hidden state fed back instead of the probability-weighted embedding.
#   python train.py config/pythia70m_hidden.py
exec(open('config/pythia70m_ponder.py').read())

out_dir = 'out-pythia70m-hidden'
wandb_run_name = 'pythia70m-hidden'
n_thoughts = 0
n_hidden = 1
# two passes of 1 slot per token: ~15 GB for a micro-batch of 8 (the plan, not yet measured on a GPU)
