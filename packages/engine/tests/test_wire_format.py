"""What the engine core sends to a model runner in another process comes back equal: the
scheduler's output with real sampling parameters (encoded by the engine, opaque to the
scheduler), and the runner's output with logprobs."""

import subprocess
import sys

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


# another Python process: decodes the step messages as a worker does, answers with what it holds
_ECHO = """
import sys, msgspec
from tessera.sampling import SamplingParams
from tessera.scheduler import ModelRunnerOutput, SchedulerOutput
data = sys.stdin.buffer.read()
first, second, runner = msgspec.msgpack.decode(data, type=tuple[bytes, bytes, bytes])
steps = [msgspec.msgpack.decode(b, type=SchedulerOutput) for b in (first, second)]
params = [msgspec.msgpack.decode(nr.sampling_params, type=SamplingParams) for nr in steps[0].new_requests]
ro = msgspec.msgpack.decode(runner, type=ModelRunnerOutput)
sys.stdout.buffer.write(msgspec.msgpack.encode([steps, params, ro]))
"""


def test_step_messages_cross_a_process_boundary_with_grammars_and_speculative_tokens():
    params = [
        SamplingParams(temperature=0.7, top_k=20, seed=11, presence_penalty=0.5, logit_bias={3: 2.0}),
        SamplingParams(temperature=0, structured=StructuredOutput(json_schema='{"type": "integer"}')),
    ]
    s = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(64, 4))
    for i, p in enumerate(params):
        payload = msgspec.msgpack.encode(p)
        s.add_request(Request(f"r{i}", [1, 2, 3, 4, 5], max_tokens=8, sampling_params=payload))
    fresh = s.schedule()  # new requests, with their encoded parameters
    s.update_from_output(fresh, ModelRunnerOutput({"r0": [9], "r1": [8]}, spec_token_ids={"r0": [4, 5]}))
    verify = s.schedule()  # r0 verifies its draft
    assert verify.scheduled_spec_tokens == {"r0": [4, 5]}
    ro = ModelRunnerOutput(
        {"r0": [4, 5, 6], "r1": [2]},
        logprobs={"r1": [[(2, -0.25), (3, -1.5)]]},
        spec_token_ids={"r0": [7, 7, 1]},
    )
    sent = msgspec.msgpack.encode([msgspec.msgpack.encode(x) for x in (fresh, verify, ro)])
    r = subprocess.run([sys.executable, "-c", _ECHO], input=sent, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    kind = tuple[list[SchedulerOutput], list[SamplingParams], ModelRunnerOutput]
    steps, decoded, ro_back = msgspec.msgpack.decode(r.stdout, type=kind)
    assert steps == [fresh, verify] and decoded == params and ro_back == ro
    assert steps[1].scheduled_spec_tokens == {"r0": [4, 5]}
    assert decoded[1].structured.json_schema == '{"type": "integer"}'
