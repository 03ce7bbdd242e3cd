"""The shared kernel-test harness (cases.py) can fail: poison reaches any stray reader, and the
tolerances tell a one-key masking bug from a correct result."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.cases import CASES, assert_close, attention_kwargs, make_inputs, reference


def test_poison_reaches_readers():
    # A reader of the poisoned input (the reference gathers every table entry, null blocks
    # included) is NaN, as is a "kernel" that attends over whole pages ignoring kv_len, and
    # padding tokens' query rows are NaN; the clean input gives finite values.
    case = {c.name: c for c in CASES}["mixed"]
    poisoned, clean = make_inputs(case)
    kw = attention_kwargs(case)
    assert bool(jnp.isnan(poisoned["k_cache"][0]).all())  # the null block
    assert bool(jnp.isnan(reference(**poisoned, **kw)).any())
    assert bool(jnp.isfinite(reference(**clean, **kw)).all())
    assert bool(jnp.isnan(poisoned["q"][sum(case.q_lens) :]).all())
    bs = case.block_size
    whole_pages = -(-poisoned["kv_lens"] // bs) * bs  # reads each last page's unwritten slots
    stray = reference(**dict(poisoned, kv_lens=whole_pages), **kw)
    assert not np.isfinite(np.asarray(stray[:1])).all()  # request 0: kv_len 33 -> 48


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ["decode_only", "bf16_mixed"])
def test_tolerances_catch_a_one_key_masking_bug(platform, name):
    # A "kernel" that drops each request's last key (where it has one to spare) fails
    # assert_close at every kernel's tolerance for the dtype.
    case = {c.name: c for c in CASES}[name]
    _, clean = make_inputs(case)
    kw = attention_kwargs(case)
    q_lens = np.zeros(clean["kv_lens"].shape, np.int32)
    q_lens[: len(case.q_lens)] = case.q_lens
    kv = clean["kv_lens"]
    one_less = jnp.where(kv > q_lens, kv - 1, kv)
    wrong = reference(**dict(clean, kv_lens=one_less), **kw)
    with pytest.raises(AssertionError):
        assert_close(wrong, reference(**clean, **kw), case, wrong.shape[0], platform)
