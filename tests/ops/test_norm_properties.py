"""Hypothesis over shapes and options: every norm op agrees with torch and the float64 reference
(lnorm's own layer norm, not the torch kernel it delegates to at these sizes)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from norm_cases import BACKENDS, OPS, check_against_torch_and_ref, has_bias, is_add, make_inputs

import lnorm

pytestmark = pytest.mark.usefixtures("own_layer_norm")

@st.composite
def norm_cases(draw):
    op = draw(st.sampled_from(OPS))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    return {
        "op": op,
        "backend": draw(st.sampled_from(BACKENDS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
        "lead": lead,
        "shape": shape,
        "weight": draw(st.booleans()),
        "bias": draw(st.booleans()) if has_bias(op) else False,
        "residual": draw(st.booleans()) if is_add(op) else False,
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=40, deadline=None)
@given(case=norm_cases())
def test_matches_torch_and_reference(case):
    inputs = make_inputs(case["op"], case["lead"], case["shape"], case["dtype"],
                         affine=case["weight"], residual=case["residual"], seed=case["seed"])
    if not case["bias"]:
        inputs["bias"] = None
    with lnorm.use_backend(case["backend"]):
        check_against_torch_and_ref(case["op"], inputs, case["shape"], eps=case["eps"],
                                    label=f"{case['backend']} {case['dtype']} ")
