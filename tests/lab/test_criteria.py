"""Each claim criterion on synthetic numbers: supported, not supported, inconclusive."""

import math

import pytest

from lnorm.lab import stats as S
from lnorm.lab.experiments import ddp
from lnorm.lab.experiments import e1_batch_size as e1
from lnorm.lab.experiments import e2_train_eval as e2
from lnorm.lab.experiments import e3_rnn as e3
from lnorm.lab.experiments import e4_transformer as e4
from lnorm.lab.experiments import e5_cnn as e5
from lnorm.lab.experiments import e6_overhead as e6
from lnorm.lab.experiments import e7_practice as e7
from lnorm.lab.experiments import e8_gradient_scale as e8

SUP, NOT, INC = S.SUPPORTED, S.NOT_SUPPORTED, S.INCONCLUSIVE
hi3 = [0.95, 0.96, 0.955]
lo3 = [0.80, 0.81, 0.79]
noisy_a, noisy_b = [0.5, 0.9, 0.1], [0.5, 0.1, 0.9]
same_a, same_b = [0.900, 0.901, 0.899], [0.9005, 0.9, 0.8995]


CASES = [
    # (id, function, args, expected)
    ("e1-c1-sup", e1.verdict_c1, ([1e-7, 2e-7], [0.5, 1.0]), SUP),
    ("e1-c1-not", e1.verdict_c1, ([1e-2, 1e-7], [0.5]), NOT),
    ("e1-c1-blind", e1.verdict_c1, ([1e-7], [1e-6]), INC),
    ("e1-c3-sup", e1.verdict_c3, (["cannot_train"] * 3, hi3, hi3, [0.10, 0.12, 0.11], [0.0, 0.01, -0.01]), SUP),
    ("e1-c3-not-bn-trains", e1.verdict_c3, (["ok"] * 3, hi3, hi3, [0.10, 0.12, 0.11], [0.0, 0.01, -0.01]), NOT),
    ("e1-c3-not-ln-fails", e1.verdict_c3, (["cannot_train"] * 3, lo3, hi3, [0.10, 0.12, 0.11], [0.0, 0.01, -0.01]), NOT),
    ("e1-c3-inc", e1.verdict_c3, (["cannot_train"] * 3, hi3, hi3, noisy_a, noisy_b), INC),
    ("e1-c6-sup", e1.verdict_c6, (same_a, same_b), SUP),
    ("e1-c6-not", e1.verdict_c6, (lo3, hi3), NOT),
    ("e1-c6-inc", e1.verdict_c6, (noisy_a, noisy_b), INC),
    ("e2-c2-sup", e2.verdict_c2, ([0.0, 1e-7], [0.5, 0.3]), SUP),
    ("e2-c2-not", e2.verdict_c2, ([0.1, 1e-7], [0.5, 0.3]), NOT),
    ("e2-c2-inc", e2.verdict_c2, ([], [0.5]), INC),
    ("e2-c1-sup", e2.verdict_c1, ([0.0], [0.4]), SUP),
    ("e2-c1-not", e2.verdict_c1, ([0.2], [0.4]), NOT),
    ("e2-c1-inc", e2.verdict_c1, ([0.0], [0.0]), INC),
    ("e3-c4-sup", e3.verdict_c4, ([0.05, 0.06, 0.055], [0.3, 0.31, 0.29], [2.0, 2.1, 2.05], [3.0, 3.1, 3.05]), SUP),
    ("e3-c4-not", e3.verdict_c4, ([0.3, 0.31, 0.29], [0.05, 0.06, 0.055], [2.0, 2.1, 2.05], [3.0, 3.1, 3.05]), NOT),
    ("e3-c4-inc", e3.verdict_c4, ([0.05, 0.06, 0.055], [0.3, 0.31, 0.29], noisy_a, noisy_b), INC),
    ("e3-c9-lm-sup", e3.verdict_c9_lm, ([2.0, 2.1, 2.05], [3.0, 3.1, 3.05]), SUP),
    ("e3-c9-lm-not", e3.verdict_c9_lm, ([3.0, 3.1, 3.05], [2.0, 2.1, 2.05]), NOT),
    ("e3-c9-lm-inc", e3.verdict_c9_lm, ([2.0], [3.0]), INC),
    ("e3-c9-acc-sup", e3.verdict_c9_acc, (hi3, lo3), SUP),
    ("e3-c9-acc-not", e3.verdict_c9_acc, (same_a, same_b), NOT),
    ("e3-c9-acc-inc", e3.verdict_c9_acc, (noisy_a, noisy_b), INC),
    ("e4-c5-sup", e4.verdict_c5, ([2.0, 2.1, 2.05], [math.inf, 3.0, 3.1]), SUP),
    ("e4-c5-not", e4.verdict_c5, ([3.0, 3.1, 3.05], [2.0, 2.1, 2.05]), NOT),
    ("e4-c5-inc", e4.verdict_c5, ([2.0], [3.0]), INC),
    ("e5-c7-sup", e5.verdict_c7, ([0.97, 0.975, 0.972], [0.95, 0.955, 0.952], [0.90, 0.91, 0.905]), SUP),
    ("e5-c7-not", e5.verdict_c7, ([0.90, 0.91, 0.905], [0.95, 0.955, 0.952], [0.80, 0.81, 0.805]), NOT),
    ("e5-c7-inc", e5.verdict_c7, ([0.97, 0.975, 0.972], [0.95, 0.955, 0.952], [0.6, 0.99, 0.3]), INC),
    ("e6-c8-sup", e6.verdict_c8, ([3.0, 3.1, 3.05], [2.0, 2.1, 2.05]), SUP),
    ("e6-c8-not", e6.verdict_c8, ([2.0, 2.1, 2.05], [3.0, 3.1, 3.05]), NOT),
    ("e6-c8-inc", e6.verdict_c8, ([2.0, 9.0, 1.0], [3.0, 3.1, 3.05]), INC),
    ("e7-c10-sup", e7.verdict_c10, ([2.0, 2.05, 2.02], {"0.1": [2.5, 2.55, 2.52], "random": [2.0, 2.06, 2.01]}), SUP),
    ("e7-c10-not", e7.verdict_c10, ([2.5, 2.55, 2.52], {"0.1": [2.0, 2.05, 2.02]}), NOT),
    ("e7-c10-inc", e7.verdict_c10, ([2.0, 2.5, 2.2], {"0.1": [2.1, 2.6, 2.0]}), INC),
    ("e7-c11-sup", S.verdict_higher_lr, ({0.1: lo3, 1.0: hi3}, {0.1: hi3, 1.0: lo3}), SUP),
    ("e7-c11-not", S.verdict_higher_lr, ({0.1: hi3, 1.0: lo3}, {0.1: hi3, 1.0: lo3}), NOT),
    ("e7-c11-inc", S.verdict_higher_lr, ({0.1: noisy_b, 1.0: [0.55, 0.9, 0.2]}, {0.1: hi3, 1.0: lo3}), INC),
    ("e8-c13-sup", e8.verdict_c13, ([0.3, 0.35, 0.32], [2.0, 2.2, 2.1], hi3), SUP),
    ("e8-c13-not", e8.verdict_c13, ([2.0, 2.2, 2.1], [0.3, 0.35, 0.32], hi3), NOT),
    ("e8-c13-not-trains", e8.verdict_c13, ([0.3, 0.35, 0.32], [2.0, 2.2, 2.1], [0.1, 0.11, 0.1]), NOT),
    ("e8-c13-inc", e8.verdict_c13, ([0.3], [2.0], [0.9]), INC),
    ("e8-c13-not-trains-at-1.5x-chance", e8.verdict_c13, ([0.3, 0.35, 0.32], [2.0, 2.2, 2.1], [0.15, 0.16, 0.17]), NOT),
    ("e2-c2-blind", e2.verdict_c2, ([0.0, 1e-7], [5e-3, 6e-3]), INC),  # BN < 100 tol: the probe may be blind
    ("e7-c10-not-random-better", e7.verdict_c10, ([2.0, 2.05, 2.02], {"0.1": [2.5, 2.55, 2.52], "random": [1.5, 1.55, 1.52]}), NOT),
    ("ddp-c1-sup", ddp.verdict_c1, ([1e-7, 3e-6], [0.1, 0.2], 1e-4), SUP),
    ("ddp-c1-not", ddp.verdict_c1, ([1e-7, 2e-4], [0.1, 0.2], 1e-4), NOT),  # one LN run off is enough
    ("ddp-c1-blind", ddp.verdict_c1, ([1e-7, 3e-6], [0.1, 5e-3], 1e-4), INC),
    ("ddp-c1-no-runs", ddp.verdict_c1, ([], [0.1], 1e-4), INC),
    ("ddp-c3-sup", ddp.verdict_c3, ([0.15, 0.16, 0.14], [0.0, 0.01, -0.01]), SUP),
    ("ddp-c3-not", ddp.verdict_c3, ([0.0, 0.01, -0.01], [0.15, 0.16, 0.14]), NOT),
    ("ddp-c3-inc", ddp.verdict_c3, (noisy_a, noisy_b), INC),
]


@pytest.mark.parametrize("fn,args,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_criterion(fn, args, expected):
    verdict, evidence = fn(*args)
    assert verdict == expected, evidence
    assert isinstance(evidence, str) and evidence


def test_every_claim_of_every_experiment_has_cases():
    from lnorm.lab import experiments

    covered = {c[0].split("-")[0] for c in CASES}
    for name in experiments.names():
        if experiments.get(name).CLAIMS and name != "retrieval":  # retrieval: tests/lab/test_retrieval.py
            assert name in covered, name
