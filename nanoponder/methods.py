"""
The methods' short names, as GPTConfig.method spells them, read back into GPTConfig fields: 'vanilla',
'ponderlm2-kK' (PonderLM-2, K thoughts per token), 'ponderlm1-nN' (PonderLM, N steps).

    from nanoponder.methods import method_fields
    GPTConfig(**method_fields('ponderlm2-k2'))   # n_thoughts=2
"""
import re

METHOD_RE = re.compile(r'vanilla|ponderlm2-k([1-9][0-9]*)|ponderlm1-n([1-9][0-9]*)')


def method_fields(name):
    """The GPTConfig fields of a method name: 'ponderlm2-k2' -> {'n_thoughts': 2, 'n_ponder': 0}."""
    m = METHOD_RE.fullmatch(name.strip().lower())
    if not m:
        zero = re.fullmatch(r'ponderlm2-k0+|ponderlm1-n0+', name.strip().lower())
        what = f"method {name!r} has K or N 0 (none at all is 'vanilla')" if zero else f"unknown method {name!r}"
        raise ValueError(f"{what}; use vanilla, ponderlm2-kK or ponderlm1-nN with K, N >= 1 (e.g. ponderlm2-k1, "
                         f"ponderlm1-n3)")
    return {'n_thoughts': int(m.group(1) or 0), 'n_ponder': int(m.group(2) or 0)}
