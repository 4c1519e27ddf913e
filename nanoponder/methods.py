"""
The methods' short names, as GPTConfig.method spells them (model.METHOD_NAMES), read back into GPTConfig fields:
'vanilla', 'ponderlm2-kK' (PonderLM-2, K thoughts per token), 'ponderlm1-nN' (PonderLM, N steps), 'pause-kK',
'loop-kK', 'hidden-nN'.

    from nanoponder.methods import method_fields
    GPTConfig(**method_fields('ponderlm2-k2'))   # n_thoughts=2
"""
import re

from model import METHOD_NAMES
from nanoponder.runtime import UserError

FIELDS = {short: field for field, (short, _) in METHOD_NAMES.items()}  # 'pause-k' -> 'n_pause': what K or N sets
METHOD_RE = re.compile(r'vanilla|(' + '|'.join(FIELDS) + r')([1-9][0-9]*)')


THOUGHT_MODES = ('exact', 'jacobi')  # how a PonderLM-2 model's thoughts are computed when it is scored


def check_thought_mode(thoughts):
    """A UserError unless thoughts names one of THOUGHT_MODES."""
    if thoughts not in THOUGHT_MODES:
        raise UserError(f"thoughts must be one of {', '.join(THOUGHT_MODES)}, got {thoughts!r}")


def method_fields(name):
    """The GPTConfig fields of a method name: 'ponderlm2-k2' -> {'n_thoughts': 2, 'n_ponder': 0, ...} (every count
    field, the others 0)."""
    m = METHOD_RE.fullmatch(name.strip().lower())
    if not m:
        zero = re.fullmatch('(' + '|'.join(FIELDS) + ')0+', name.strip().lower())
        what = f"method {name!r} has K or N 0 (none at all is 'vanilla')" if zero else f"unknown method {name!r}"
        raise ValueError(f"{what}; use vanilla, ponderlm2-kK, ponderlm1-nN, pause-kK, loop-kK or hidden-nN with "
                         f"K, N >= 1 (e.g. ponderlm2-k1, ponderlm1-n3)")
    fields = {field: 0 for field in FIELDS.values()}
    if m.group(1):
        fields[FIELDS[m.group(1)]] = int(m.group(2))
    return fields
