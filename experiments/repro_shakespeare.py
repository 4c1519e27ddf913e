# The CPU experiment of the README "Results": do latent thoughts pay off when the trunk, not the embeddings, is
# most of the model? On top of config/shakespeare_ponder.py, which gives the data (Tiny Shakespeare with a 512-id
# byte-level BPE trained on its train split, data/shakespeare-bpe512), the pythia-14m trunk (6 layers, 4 heads,
# 128 wide: 1.19M non-embedding parameters against 0.13M embedding ones), the batch (16 x 128 tokens), the
# optimizer and the device, this file sets the budget and the init rule (weight_init 'small', and each method's
# official embedding scale: not one init for all, see docs/design.md; the runs vanilla-scale and hidden-scale
# give vanilla and Hidden PonderLM-2's). It is the vanilla run; experiments/repro.py adds each run's method
# (--n_thoughts=1, --n_layer=12, ...), its seed, an absolute --data_dir and one out_dir per run. By hand, from the
# repository root, e.g.:
#   python train.py config/shakespeare_ponder.py experiments/repro_shakespeare.py --n_thoughts=1 \
#       --out_dir=out-repro/ponderlm2-k1-s1337
# 600 iterations of 16 x 128 tokens = 1.23M tokens, about 2.4 epochs of the 517K train tokens; each evaluation
# reads the same 8 x 16 val blocks (16K of the val split's 30K tokens; 59K before it was cut into val and test).

out_dir = 'out-repro/vanilla'
wandb_run_name = 'repro-vanilla'
eval_interval = 50
always_save_checkpoint = True
max_iters = 600

n_thoughts = 0
n_ponder = 0
scale_embeds = True
weight_init = 'small'
seed = 1337
