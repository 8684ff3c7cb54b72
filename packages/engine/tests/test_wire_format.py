"""What the engine core sends to a model runner in another process comes back equal: the
scheduler's output with real sampling parameters (encoded by the engine, opaque to the
scheduler), and the runner's output with logprobs."""

import msgspec

from tessera.kvcache import KVCacheManager, KVCacheSpec, group_layers
from tessera.sampling import SamplingParams, StructuredOutput
from tessera.scheduler import (
    ModelRunnerOutput,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


def roundtrip(value, type_):
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=type_)


def test_scheduler_output_with_real_sampling_params_comes_back_equal_and_decodes_to_them():
    params = [
        SamplingParams(
            temperature=0.7, top_p=0.9, seed=3, logit_bias={5: -2.5, 17: 1.0}, stop=["x"], logprobs=2
        ),
        SamplingParams(
            temperature=0,
            max_tokens=None,
            structured=StructuredOutput(json_schema='{"type": "object"}'),
            prompt_logprobs=1,
        ),
        SamplingParams(structured=StructuredOutput(choice=["yes", "no"]), allowed_token_ids=[1, 2, 3]),
    ]
    groups = group_layers([KVCacheSpec(), KVCacheSpec(8)])
    s = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(64, 4, groups=groups))
    for i, p in enumerate(params):
        payload = msgspec.msgpack.encode(p)  # as the engine makes it
        s.add_request(Request(f"r{i}", [1, 2, 3, 4, 5], max_tokens=4, sampling_params=payload))
    so = s.schedule()
    back = roundtrip(so, SchedulerOutput)
    assert back == so
    for nr, p in zip(back.new_requests, params, strict=True):
        decoded = msgspec.msgpack.decode(nr.sampling_params, type=SamplingParams)
        assert decoded == p and decoded.logit_bias == p.logit_bias
    # the next step carries only deltas: per-group new blocks and the scheduler's counts
    s.update_from_output(so, ModelRunnerOutput({f"r{i}": [9] for i in range(3)}))
    so = s.schedule()
    assert [(c.num_computed_tokens, c.num_tokens) for c in so.cached_requests] == [(5, 6)] * 3
    assert roundtrip(so, SchedulerOutput) == so


def test_model_runner_output_with_sampled_and_prompt_logprobs_comes_back_equal():
    ro = ModelRunnerOutput(
        {"a": [11], "b": [3]},
        logprobs={"a": [[(11, -0.125), (4, -2.5)]], "b": [[(3, 0.0)]]},
        prompt_logprobs={"a": [[(7, -1.0), (7, -1.0), (2, -4.75)], [(8, -0.5), (8, -0.5), (9, -1.25)]]},
    )
    back = roundtrip(ro, ModelRunnerOutput)
    assert back == ro
    assert all(isinstance(e, tuple) for steps in back.logprobs.values() for entry in steps for e in entry)
