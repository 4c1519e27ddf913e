"""
Export a model as a Hugging Face directory, to share it on the Hub or load it elsewhere: config.json (GPT-NeoX,
plus the method's keys in the official PonderLM code's spelling), model.safetensors, tokenizer.json and
tokenizer_config.json; every method but vanilla also gets its code (modeling_nanoponder.py and model.py), so that
transformers runs it as itself with trust_remote_code=True.

    python export_hf.py --init_from=out-shakespeare-ponder/ckpt.pt --out=hf-shakespeare-ponder
    python export_hf.py --out_dir=out --out=hf-out            # init_from=resume: out_dir/ckpt.pt
    huggingface-cli upload you/your-model hf-out               # then share it

Load it back with nanoponder.hf.load_pretrained('hf-out') (sample.py / eval.py --init_from=hf-out), or in
transformers: a vanilla model is a stock GPT-NeoX (AutoModelForCausalLM.from_pretrained('hf-out'), the embedding
scale folded into its weights), every other method needs AutoModelForCausalLM.from_pretrained('hf-out',
trust_remote_code=True), which gives nanoPonder's logits and generation; without it transformers refuses the
directory (its model type is 'nanoponder') instead of building a plain GPT-NeoX that would compute something else.
--init_from takes what sample.py and eval.py take (nanoponder.checkpoint.load_init_from). Exit codes:
nanoponder/runtime.py.
"""
import os
import sys
import tempfile

from nanoponder.checkpoint import load_init_from
from nanoponder.hf import REMOTE_CODE, read_config, jacobi_train_range_from_hf, save_pretrained
from nanoponder.runtime import UserError, failure, one_line, run_cli
from nanoponder.tokenizer import model_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'    # 'resume' (out_dir/ckpt.pt), a train.py checkpoint file, a Hugging Face directory or hub id
out_dir = 'out'         # where init_from='resume' looks for ckpt.pt
out = ''                # the directory to write (required)
tokenizer = ''          # '' = the model's own; else pythia | gpt2 | path/to/tokenizer.json
patch_method = ''       # an official baseline's Hugging Face directory: ours | pause | loop | ponderlm | vanilla (its
                        # --patch_method); '' = config.json's patch_method (our exports write it), else ours
overwrite = False       # write into an out directory that already holds a model
# -----------------------------------------------------------------------------


WRITTEN = ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
           *REMOTE_CODE)  # hf.save_pretrained's
NOT_WRITTEN = ('model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json')  # other weights


def check_out():
    if not out:
        raise UserError("where to? pass --out=DIR (a new directory for the Hugging Face files)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file, not a directory")
    held = [name for name in WRITTEN + NOT_WRITTEN if os.path.exists(os.path.join(out, name))]
    if held and not overwrite:
        what = 'a model' if {'config.json', 'model.safetensors'} & set(held) else 'files that the export writes'
        raise UserError(f"{out} already holds {what} ({', '.join(held)}): choose another --out or pass "
                        f"--overwrite=True")
    stale = [name for name in held if name in NOT_WRITTEN]
    if stale:  # --overwrite=True replaces what the export writes; these would stay and be read with it
        raise UserError(f"{out} holds {', '.join(stale)}, which the export does not replace and a loader would read "
                        f"instead of (or with) the new model.safetensors: remove it first, or choose another --out")


def jacobi_train_range(ckpt, source):
    """The range that the model's training drew R from: the run's, or the Hugging Face model's."""
    if ckpt is not None:
        return tuple((ckpt.config or {}).get('jacobi_train_range', (2, 4)))
    return jacobi_train_range_from_hf(read_config(source)) if os.path.isdir(source) else None


def main():
    check_out()
    model, ckpt, source = load_init_from(init_from, out_dir, patch_method=patch_method)
    tok = model_tokenizer(source, ckpt, tokenizer, model.config.vocab_size)
    if tok.json_text is None:
        raise UserError(f"the model's tokenizer ({tok.name}) has no tokenizer.json to export; pass "
                        f"--tokenizer=path/to/tokenizer.json")
    try:
        with tempfile.TemporaryDirectory() as tmp:  # a checkpoint's tokenizer is text, save_pretrained copies a file
            path = os.path.join(tmp, 'tokenizer.json')
            with open(path, 'wb') as f:
                f.write(tok.json_text.encode('utf-8'))
            save_pretrained(model, out, path, jacobi_train_range=jacobi_train_range(ckpt, source))
    except OSError as e:  # a disk that fills, a file size limit: the run failed (exit 1), like any failed write
        raise failure(f"could not write {out}: {one_line(e)}") from None
    cfg = model.config
    print(f"wrote {out}: {cfg.method_label}, {model.get_num_params(non_embedding=False):,} parameters, "
          f"tokenizer {tok.name}")
    if cfg.method != 'vanilla':
        print(f"note: in transformers, load it with AutoModelForCausalLM.from_pretrained({out!r}, "
              f"trust_remote_code=True): its code ({', '.join(REMOTE_CODE)}) runs its {cfg.method_label}",
              file=sys.stderr)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    run_cli(main)
