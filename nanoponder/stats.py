"""
Paired comparisons over seeds, for an experiment's report: the mean difference with its 95% t-interval, the
paired-t p (two-sided, or one-sided against a non-inferiority margin), Holm's adjustment over a family, an exact
sign-flip permutation p, the smallest difference a design detects, and the words a p earns.

    c = paired_test([0.01, -0.02, 0.03], test='two-sided')   # run - base per seed
    adjusted = holm([c['p'] for c in family])
"""
import itertools
import math

from scipy import stats as scipy_stats


def paired_test(diffs, test='two-sided', margin=0.0):
    """diffs: run - base per seed (n >= 2). -> n, mean, sd, the 95% t-interval of the mean, the paired-t p and the
    exact sign-flip p. test 'two-sided': H0 mean = 0; 'non-inferiority': H0 mean >= margin (the run is worse by at
    least margin, a loss being lower-is-better), one-sided."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    half = scipy_stats.t.ppf(0.975, n - 1) * se
    if test == 'two-sided':
        p = 2 * scipy_stats.t.sf(abs(mean) / se, n - 1) if se > 0 else (1.0 if mean == 0 else 0.0)
    elif test == 'non-inferiority':
        p = scipy_stats.t.cdf((mean - margin) / se, n - 1) if se > 0 else float(mean >= margin)
    else:
        raise ValueError(f"test must be 'two-sided' or 'non-inferiority', got {test!r}")
    return dict(n=n, mean=mean, sd=sd, low=mean - half, high=mean + half, p=float(p),
                p_sign_flip=sign_flip_p(diffs, test, margin))


def sign_flip_p(diffs, test='two-sided', margin=0.0):
    """The exact permutation p of the mean under H0 (each difference as likely negative as positive, around 0 or,
    for non-inferiority, around margin): the share of all 2^n sign patterns whose mean is at least as extreme."""
    centred = [d - (margin if test == 'non-inferiority' else 0.0) for d in diffs]
    observed = sum(centred)
    extreme = 0
    for signs in itertools.product((1, -1), repeat=len(centred)):
        total = sum(s * abs(d) for s, d in zip(signs, centred))
        if test == 'two-sided':
            extreme += abs(total) >= abs(observed) - 1e-12
        else:  # small (very negative) means are the evidence against H0
            extreme += total <= observed + 1e-12
    return extreme / 2 ** len(centred)


def holm(pvalues):
    """Holm's step-down adjustment of a family's p-values (in their order): the k-th smallest times (m - k + 1),
    never below an earlier one, at most 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def detectable(sd, n, alpha, power=0.8, test='two-sided'):
    """The smallest true mean difference (for non-inferiority: distance below the margin) that a paired t-test over
    n seeds finds with this power at level alpha, given the differences' sd: (t_{1-alpha/2} + t_{power}) sd /
    sqrt(n), t_{1-alpha} one-sided; the usual central-t approximation of the noncentral t."""
    df = n - 1
    level = 1 - alpha / 2 if test == 'two-sided' else 1 - alpha
    return (scipy_stats.t.ppf(level, df) + scipy_stats.t.ppf(power, df)) * sd / math.sqrt(n)


def verdict(p_adjusted, test='two-sided', alpha=0.05, suggestive=0.2):
    """The words an adjusted p earns, by the pre-registered rule."""
    if p_adjusted < alpha:
        return 'holds' if test == 'two-sided' else 'non-inferior'
    if p_adjusted < suggestive:
        return 'suggestive'
    return 'no difference shown' if test == 'two-sided' else 'not shown'


def p_text(p):
    """Two significant digits: 3.1e-04, 3.1e-01."""
    return f"{p:.1e}"
