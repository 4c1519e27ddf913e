"""
Export a model as a Hugging Face GPT-NeoX directory, to share it on the Hub or load it elsewhere:
config.json (GPT-NeoX, plus the method's keys in the official PonderLM code's spelling), model.safetensors,
tokenizer.json and tokenizer_config.json.

    python export_hf.py --init_from=out-shakespeare-ponder/ckpt.pt --out=hf-shakespeare-ponder
    python export_hf.py --out_dir=out --out=hf-out            # init_from=resume: out_dir/ckpt.pt
    huggingface-cli upload you/your-model hf-out               # then share it

Load it back with GPT.from_pretrained('hf-out') (sample.py / eval.py --init_from=hf-out), or, for a vanilla
model, with stock transformers (AutoModelForCausalLM.from_pretrained('hf-out')) and the same logits: the
embedding scale of a vanilla nanoPonder model is folded into its weights. Stock transformers has no latent
thoughts or pondering: it would load a PonderLM model as a plain GPT-NeoX, computing something else.
Exit codes: runtime.py.
"""
import os
import sys

from eval import load_model
from runtime import UserError, one_line, run_cli

# -----------------------------------------------------------------------------
init_from = 'resume'    # 'resume' (out_dir/ckpt.pt), a path to a ckpt.pt, or a Hugging Face directory or hub id
out_dir = 'out'         # where init_from='resume' looks for ckpt.pt
out = ''                # the directory to write (required)
tokenizer = ''          # '' = the model's own; else pythia | gpt2 | path/to/tokenizer.json
overwrite = False       # write into an out directory that already holds a model
# -----------------------------------------------------------------------------


def check_out():
    if not out:
        raise UserError("where to? pass --out=DIR (a new directory for the Hugging Face files)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file, not a directory")
    if os.path.isfile(os.path.join(out, 'config.json')) and not overwrite:
        raise UserError(f"{out} already holds a model (config.json): choose another --out or pass --overwrite=True")


def main():
    check_out()
    model, tok, _ = load_model(init_from, out_dir, tokenizer)
    if tok.path is None:
        raise UserError(f"the model's tokenizer ({tok.name}) has no tokenizer.json to export; pass "
                        f"--tokenizer=path/to/tokenizer.json")
    try:
        model.save_pretrained(out, tok.path)
    except OSError as e:
        raise UserError(f"cannot write {out}: {one_line(e)}") from None
    cfg = model.config
    print(f"wrote {out}: {cfg.method_label}, {model.get_num_params(non_embedding=False):,} parameters, "
          f"tokenizer {tok.name}")
    if cfg.n_thoughts or cfg.n_ponder:
        print(f"note: load it with nanoPonder (GPT.from_pretrained) or the official PonderLM code; stock "
              f"transformers would run it as a plain GPT-NeoX, without its {cfg.method_label}", file=sys.stderr)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
