"""npformer.tour.timing: the side-by-side timings time what they say (no timing asserts).

Performance is measured, not asserted: nothing here compares a time with a number. What is
checked is the structure of the result (every variant, every timing, every sample, finite
and positive, the median of its samples, tokens/s from the median) and that the timed code
is the real thing: the training step changes every weight, the decode feeds one token at a
time through a KV cache that grows to decode_tokens, the attention timing runs GPT-3's local
layer with its window (its output is the banded attention of its q, k, v, and differs from
the dense one), on the job's thread count, which is restored afterwards.

Two QUICK jobs with 2 repeats, each run once (module fixtures) with recorders around
``build_model`` (every model's forward calls) and the flash-attention kernels.
"""

import json
import math
import statistics

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from npformer.functional.attention import attention_forward
from npformer.kernels import flash_attention
from npformer.models import build_model
from npformer.tour import plan, timing

REPEATS = 2
RUNS = timing.WARMUP + REPEATS  # every variant runs each timed operation this many times
THREADS_BEFORE = min(2, numba.config.NUMBA_NUM_THREADS)  # ≠ the job's 1 thread when possible


def quick_job(name: str) -> dict:
    (comparison,) = plan.get_comparisons([name])
    job = plan.timing_job(comparison, plan.QUICK)
    job["repeats"] = REPEATS
    return job


def blas_threads():
    return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})


class Recorder:
    """Every model the timing builds, and each call of its forward: (T, whether a KV cache
    was passed, the first layer's cache length after the call, numba's and BLAS's threads)."""

    def __init__(self):
        self.models = []  # (config, model, calls)

    def build_model(self, config, seed=0):
        model = build_model(config, seed=seed)
        calls = []
        forward = model.forward

        def recording_forward(ids=None, doc_ids=None, **kwargs):
            logits = forward(ids, doc_ids, **kwargs)
            caches = kwargs.get("kv_caches")
            calls.append(dict(shape=ids.shape, doc_ids=doc_ids, cached=caches is not None,
                              cache_length=None if caches is None else caches[0].length,
                              numba_threads=numba.get_num_threads(), blas=blas_threads()))
            return logits

        object.__setattr__(model, "forward", recording_forward)
        self.models.append((config, model, calls))
        return model


def run_recorded(job):
    """(result, recorder, attention calls at long_seq_len, numba's threads after)."""
    recorder = Recorder()
    long_calls = []
    counts = dict(backward=0)
    forward, backward = flash_attention.flash_attention_forward, flash_attention.flash_attention_backward

    def recording_attention(q, k, v, **kwargs):
        o, cache = forward(q, k, v, **kwargs)
        if q.shape[2] == job["long_seq_len"]:
            long_calls.append(dict(q=q.copy(), k=k.copy(), v=v.copy(), o=o.copy(), kwargs=kwargs,
                                   numba_threads=numba.get_num_threads()))
        return o, cache

    def counting_backward(do, cache):
        if do.shape[2] == job["long_seq_len"]:
            counts["backward"] += 1
        return backward(do, cache)

    saved_threads = numba.get_num_threads()
    numba.set_num_threads(THREADS_BEFORE)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(timing, "build_model", recorder.build_model)
            patch.setattr(flash_attention, "flash_attention_forward", recording_attention)
            patch.setattr(flash_attention, "flash_attention_backward", counting_backward)
            result = timing.run_timing_job(job)
        threads_after = numba.get_num_threads()
    finally:
        numba.set_num_threads(saved_threads)
    return result, recorder, long_calls, counts["backward"], threads_after


@pytest.fixture(scope="module")
def kv_heads():
    job = quick_job("kv-heads")
    return (job, json.loads(json.dumps(job))) + run_recorded(job)


@pytest.fixture(scope="module")
def attention_pattern():
    job = quick_job("attention-pattern")
    return (job, json.loads(json.dumps(job))) + run_recorded(job)


@pytest.fixture(params=["kv-heads", "attention-pattern"])
def any_run(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


def test_the_result_has_the_schema_and_every_sample(any_run):
    job, job_before, result = any_run[:3]
    assert set(result) == {"id", "kind", "comparison", "job", "threads", "timings"}
    assert (result["id"], result["kind"], result["comparison"], result["threads"]) == \
        (job["id"], "timing", job["comparison"], 1)
    assert result["job"] == job_before  # the job, unchanged
    json.dumps(result)  # every value JSON-serialisable
    variants = [v["variant"] for v in job["variants"]]
    assert list(result["timings"]) == job["timings"]
    for name, timed in result["timings"].items():
        assert timed["unit"] == {"train_step": "ms", "decode": "tokens/s", "attention": "ms"}[name]
        assert isinstance(timed["what"], str) and f"median of {REPEATS} alternating" in timed["what"]
        assert list(timed["median"]) == variants and list(timed["samples"]) == variants
        for variant in variants:
            samples = timed["samples"][variant]
            assert len(samples) == REPEATS
            assert all(isinstance(s, float) and math.isfinite(s) and s > 0 for s in samples)
            assert timed["median"][variant] == statistics.median(samples)
        if name == "train_step":
            for variant in variants:
                step_seconds = timed["median"][variant] / 1e3
                assert timed["tokens_per_s"][variant] == pytest.approx(
                    job["batch_size"] * job["seq_len"] / step_seconds, rel=1e-12)
        else:
            assert "tokens_per_s" not in timed


def train_models(recorder, job):
    """The models whose forwards were training batches (B, T) without a cache."""
    return [(config, model, calls) for config, model, calls in recorder.models
            if calls and all(not c["cached"] and c["shape"] == (job["batch_size"], job["seq_len"])
                             for c in calls)]


def test_the_timed_training_step_is_a_real_step(any_run):
    """One model per variant ran WARMUP + repeats steps on (B, T) batches, and every one of its
    parameters moved away from the freshly built weights (AdamW stepped all of them)."""
    job, _, _, recorder = any_run[:4]
    trained = train_models(recorder, job)
    assert [config.max_seq_len for config, _, _ in trained] == [job["seq_len"]] * len(job["variants"])
    for config, model, calls in trained:
        assert len(calls) == RUNS
        fresh = build_model(config, seed=0).parameters()
        for name, value in model.parameters().items():
            assert not np.array_equal(value, fresh[name]), f"{name} was not updated"
    assert {c.kv_heads for c, _, _ in trained} == (
        {4, 2, 1} if job["comparison"] == "kv-heads" else {4})


def test_decode_feeds_one_token_at_a_time_through_the_kv_cache(kv_heads):
    """Per variant: decode_tokens forwards per run, each of 1 token, the cache growing
    1, 2, ..., decode_tokens, in WARMUP + repeats runs; the model's positions reach that far."""
    job, _, _, recorder = kv_heads[:4]
    n = job["decode_tokens"]
    decoders = [(config, calls) for config, _, calls in recorder.models
                if calls and all(c["cached"] for c in calls)]
    assert len(decoders) == len(job["variants"])
    for config, calls in decoders:
        assert config.max_seq_len >= n + 1
        assert [c["shape"] for c in calls] == [(1, 1)] * (n * RUNS)
        assert [c["cache_length"] for c in calls] == list(range(1, n + 1)) * RUNS
    assert sorted(config.kv_heads for config, _ in decoders) == [1, 2, 4]


def test_the_attention_timing_runs_the_local_layer_with_its_window(attention_pattern):
    """At long_seq_len, gpt2's 2 layers and gpt3's dense layer ran causal dense attention,
    gpt3's second layer the window of 16: each output equals the readable reference with its
    own mask, and the banded output is not the dense one (the window changed the result)."""
    job, _, result, recorder, long_calls, backward_calls = attention_pattern[:6]
    L = job["long_seq_len"]
    window = plan.QUICK.window
    # per run: gpt2 → (None, None), gpt3 → (None, window)
    windows = [call["kwargs"]["window"] for call in long_calls]
    assert sorted(windows, key=str) == sorted([None] * 3 * RUNS + [window] * RUNS, key=str)
    assert backward_calls == len(long_calls) == 4 * RUNS
    assert all(call["kwargs"]["causal"] for call in long_calls)
    assert all(call["q"].shape[:3] == (1, 4, L) for call in long_calls)  # batch 1, H, long T
    banded = next(call for call in long_calls if call["kwargs"]["window"] == window)
    dense = next(call for call in long_calls if call["kwargs"]["window"] is None)
    for call in (banded, dense):
        q, k, v = (call[name].astype(np.float64) for name in "qkv")
        reference, _ = attention_forward(q, k, v, causal=True, window=call["kwargs"]["window"])
        np.testing.assert_allclose(call["o"], reference, rtol=1e-4, atol=1e-5)
    q, k, v = (banded[name].astype(np.float64) for name in "qkv")
    dense_of_banded, _ = attention_forward(q, k, v, causal=True)
    assert np.abs(dense_of_banded - banded["o"]).max() > 1e-3
    # the models of this timing have positions for long_seq_len
    assert sorted(c.max_seq_len for c, _, calls in recorder.models if not calls) == [L, L]
    assert f"window of {window} keys" in result["timings"]["attention"]["what"]


def test_threads_are_the_jobs_inside_and_restored_after(any_run):
    job, _, _, recorder, long_calls, _, threads_after = any_run
    calls = [c for _, _, model_calls in recorder.models for c in model_calls] + long_calls
    assert calls and {c["numba_threads"] for c in calls} == {job["threads"]}
    assert all(c["blas"] == [job["threads"]] for c in calls if "blas" in c)
    assert threads_after == THREADS_BEFORE


def test_rounds_alternate_and_rotate_the_first_variant():
    order = []
    runs = {name: (lambda name=name: order.append(name) or 1.0) for name in "ABC"}
    samples = timing.alternate(runs, repeats=3, warmup=1)
    assert order == list("ABC") + list("ABC" "BCA" "CAB")
    assert samples == {name: [1.0] * 3 for name in "ABC"}


@pytest.mark.parametrize("change, message", [
    (dict(timings=["train_step", "prefill"]), "timings must be a list of names from"),
    (dict(repeats=0), "repeats must be an integer >= 1, got 0"),
    (dict(seq_len=16.0), "seq_len must be an integer >= 1, got float"),
    (dict(threads=10**6), "threads is 1000000, but numba has only"),
    (dict(variants=[]), "variants must be a non-empty list"),
    (dict(dtype="float16"), "'llama1'"),
])
def test_a_bad_job_gets_a_clear_error(change, message):
    job = quick_job("kv-heads")
    job.update(change)
    threads = numba.get_num_threads()
    with pytest.raises(ValueError, match="timing job 'timing-kv-heads'") as error:
        timing.run_timing_job(job)
    assert message in str(error.value)
    assert numba.get_num_threads() == threads


def test_a_job_missing_a_field_is_named():
    job = quick_job("attention-pattern")
    del job["long_seq_len"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['long_seq_len'\]"):
        timing.run_timing_job(job)
