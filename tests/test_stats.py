"""The report's statistics (nanoponder/stats.py) against hand computations on made-up numbers: a paired t-test
through the closed form of Student's t with 3 degrees of freedom, Holm's order, exact sign-flip p-values.

    python -m pytest tests/test_stats.py -q
"""
import math

import pytest

from nanoponder.stats import detectable, holm, p_text, paired_test, sign_flip_p, verdict


def t3_cdf(t):
    """Student's t CDF with 3 degrees of freedom, in closed form: 1/2 + (x / (1 + x^2) + atan x) / pi, x = t/sqrt 3."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_a_paired_t_test_by_hand():
    c = paired_test([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt(5 / 3) / 2  # sd sqrt(5/3) over sqrt(4)
    assert (c['n'], c['mean']) == (4, 2.5) and c['sd'] == pytest.approx(math.sqrt(5 / 3))
    assert c['p'] == pytest.approx(2 * (1 - t3_cdf(2.5 / se)), rel=1e-9)  # 0.0305
    assert c['p'] == pytest.approx(0.030466, abs=1e-6)
    t975 = 3.182446305  # the 97.5% point of t with 3 degrees of freedom (tables)
    assert (c['low'], c['high']) == (pytest.approx(2.5 - t975 * se), pytest.approx(2.5 + t975 * se))
    assert c['p_sign_flip'] == 2 / 16  # only all-positive and all-negative are as extreme
    # one-sided non-inferiority: H0 the run is at least the margin worse
    c = paired_test([0.001, 0.002, 0.003, 0.004], 'non-inferiority', margin=0.01)
    assert c['p'] == pytest.approx(t3_cdf((0.0025 - 0.01) / (se / 1000)), rel=1e-6)  # ~6.9e-04
    assert c['p_sign_flip'] == 1 / 16  # every difference below the margin: only the observed pattern
    assert paired_test([0.02, 0.03, 0.01, 0.04], 'non-inferiority', margin=0.01)['p'] > 0.5
    with pytest.raises(ValueError, match='two-sided'):
        paired_test([1.0, 2.0], 'one-sided')


def test_sign_flips_holm_and_words():
    # sums of +-1 +-2 +-3: 6, 0, 2, -4, 4, -2, 0, -6; at least |2|: six of eight
    assert sign_flip_p([1.0, -2.0, 3.0]) == 6 / 8
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01, 2 x 0.03, max(0.06, 0.04)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002]) and holm([0.9, 0.8]) == [1.0, 1.0]
    assert [verdict(p) for p in (0.049, 0.19, 0.2)] == ['holds', 'suggestive', 'no difference shown']
    assert verdict(0.01, 'non-inferiority') == 'non-inferior' and verdict(0.5, 'non-inferiority') == 'not shown'
    assert p_text(0.00031) == '3.1e-04' and p_text(0.31) == '3.1e-01'
    assert detectable(0.01, 10, 0.05 / 8) < detectable(0.01, 3, 0.05 / 8)
    assert paired_test([0.5, 0.5, 0.5])['p'] == 0.0 and paired_test([0.0, 0.0])['p'] == 1.0  # no spread
