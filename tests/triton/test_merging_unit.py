"""Merging forwarded calls (server/upstreams/triton/merging.py) against a scripted Triton:
concurrent requests for a variant go as one call whose reply is cut back per request, exactly as
each would have been answered alone; errors stay each request's own."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from server.catalog import Repository, Variant, load_repository
from server.errors import DeadlineExceeded
from server.upstreams.base import UpstreamUnavailable
from server.upstreams.triton.merging import (
    ForwardMerger,
    merge_key,
    mergeable,
    merged_request,
    split_reply,
)
from server.upstreams.triton.upstream import UpstreamStatus


@pytest.fixture
def variant(tiny_repository: Path) -> Variant:
    repository: Repository = load_repository(tiny_repository)
    return repository.models["tiny"].variants["fp32"]


def _request(x: np.ndarray, rid: str, **params: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="tiny", id=rid)
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype(np.float32).tobytes())
    req.outputs.add(name="logits")
    for k, v in params.items():
        req.parameters[k].string_param = v
    return req


class ScriptedTriton:
    """Answers ModelInfer bytes like Triton would for a row-wise model: ``logits`` (N, 4) with
    row i = [sum(x_i), max(x_i), rows in the call, 7]; a request with a NaN is refused with
    INVALID_ARGUMENT naming its id; ``gate`` holds every call until it is set."""

    def __init__(self, gated: bool = False) -> None:
        self.calls: list[pb.ModelInferRequest] = []
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None
        self.unavailable = False

    async def send(self, variant: Variant, payload: bytes, deadline: float | None) -> bytes:
        request = pb.ModelInferRequest.FromString(payload)
        self.calls.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.unavailable:
            raise UpstreamUnavailable(f"{variant.name} is not ready on any replica")
        x = np.frombuffer(request.raw_input_contents[0], np.float32)
        x = x.reshape(list(request.inputs[0].shape))
        if np.isnan(x).any():
            raise UpstreamStatus("INVALID_ARGUMENT", f"request {request.id!r}: NaN in 'x'")
        rows = x.shape[0]
        y = np.stack(
            [x.sum(axis=1), x.max(axis=1), np.full(rows, rows), np.full(rows, 7.0)], axis=1
        ).astype(np.float32)
        reply = pb.ModelInferResponse(model_name=variant.name, model_version="1", id=request.id)
        reply.outputs.add(name="logits", datatype="FP32", shape=list(y.shape))
        reply.raw_output_contents.append(y.tobytes())
        reply.parameters["triton_note"].string_param = "kept"
        return reply.SerializeToString()


def _logits(reply: bytes) -> tuple[pb.ModelInferResponse, np.ndarray]:
    r = pb.ModelInferResponse.FromString(reply)
    return r, np.frombuffer(r.raw_output_contents[0], np.float32).reshape(list(r.outputs[0].shape))


def _submit(
    merger: ForwardMerger,
    variant: Variant,
    inputs: list[np.ndarray],
    deadlines: list[float | None] | None = None,
) -> list[asyncio.Future[bytes]]:
    """Each input as request ``id-<i>``, all forwarded at once (nothing has run yet)."""
    deadlines = deadlines or [None] * len(inputs)
    return [
        asyncio.ensure_future(
            merger.forward(variant, _request(x, f"id-{i}").SerializeToString(), d)
        )
        for i, (x, d) in enumerate(zip(inputs, deadlines, strict=True))
    ]


def _inputs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1 + i % 3, 16)).astype(np.float32) for i in range(n)]


def test_tiny_variants_are_mergeable_and_configs_decide(variant: Variant) -> None:
    assert mergeable(variant)  # the builder writes dynamic_batching, max_batch_size > 0
    no_batcher = variant.config.__class__()
    no_batcher.CopyFrom(variant.config)
    no_batcher.ClearField("dynamic_batching")
    assert not mergeable(_with_config(variant, no_batcher))
    sequence = no_batcher.__class__()
    sequence.CopyFrom(variant.config)
    sequence.sequence_batching.SetInParent()
    assert not mergeable(_with_config(variant, sequence))


def _with_config(variant: Variant, config) -> Variant:
    from dataclasses import replace

    return replace(variant, config=config)


def test_merge_key_refuses_what_triton_must_see_alone() -> None:
    x = np.zeros((2, 16), np.float32)
    key, rows = merge_key(_request(x, "a")) or (None, 0)
    assert rows == 2 and key == merge_key(_request(np.ones((3, 16)), "b"))[0]  # type: ignore[index]
    assert merge_key(_request(np.zeros((2, 15)), "c"))[0] != key  # type: ignore[index]
    assert merge_key(_request(x, "d", sequence_id="9")) is None  # Triton's parameters
    assert merge_key(_request(x, "d", priority="1", precision="int8")) is None
    routed = merge_key(_request(x, "d", precision="int8", **{"x-request-key": "k"}))
    assert routed == (key, 2)  # the gateway's own parameters: Triton never reads them
    short = _request(x, "e")
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]  # not its shape's size
    assert merge_key(short) is None
    typed = pb.ModelInferRequest(model_name="tiny")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
    assert merge_key(typed) is None  # typed contents, not raw
    text = pb.ModelInferRequest(model_name="tiny")
    text.inputs.add(name="x", datatype="BYTES", shape=[1])
    text.raw_input_contents.append(b"\x01\x00\x00\x00a")
    assert merge_key(text) is None
    classified = _request(x, "f")
    classified.outputs[0].parameters["classification"].int64_param = 3
    assert merge_key(classified) is None


def test_gateway_parameters_are_the_cores() -> None:
    from server.dataplane.gateway import PRECISION_PARAMETER, REQUEST_KEY
    from server.upstreams.triton.merging import GATEWAY_PARAMETERS

    assert {PRECISION_PARAMETER, REQUEST_KEY} == GATEWAY_PARAMETERS


def test_merged_reply_cut_back_equals_each_alone(variant: Variant) -> None:
    triton = ScriptedTriton()
    inputs = _inputs(5)
    requests = [_request(x, f"id-{i}") for i, x in enumerate(inputs)]
    from server.upstreams.triton.merging import Member

    loop = asyncio.new_event_loop()
    try:
        members = [
            Member(r, r.SerializeToString(), x.shape[0], None, loop.create_future())
            for r, x in zip(requests, inputs, strict=True)
        ]
        merged = loop.run_until_complete(
            triton.send(variant, merged_request(variant, members), None)
        )
        replies = split_reply(merged, members)
    finally:
        loop.close()
    assert len(triton.calls) == 1 and triton.calls[0].inputs[0].shape == [
        sum(x.shape[0] for x in inputs),
        16,
    ]
    for x, rid, reply in zip(inputs, (r.id for r in requests), replies, strict=True):
        r, y = _logits(reply)
        assert r.id == rid and r.model_name == variant.name and r.model_version == "1"
        assert r.parameters["triton_note"].string_param == "kept"
        assert list(r.outputs[0].shape) == [x.shape[0], 4]
        np.testing.assert_allclose(y[:, 0], x.sum(axis=1), rtol=1e-5)
        np.testing.assert_allclose(y[:, 1], x.max(axis=1))


def test_requests_wait_while_the_limit_is_in_flight_then_go_as_one(variant: Variant) -> None:
    async def scenario() -> None:
        triton = ScriptedTriton(gated=True)
        merger = ForwardMerger(triton.send, lambda v: 1, limit=1)
        inputs = _inputs(6, seed=1)
        tasks = _submit(merger, variant, inputs)
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(triton.calls) == 1  # the first goes alone, at once; the others wait
        triton.gate.set()
        replies = await asyncio.gather(*tasks)
        # alone, then the five that waited merged into one call of all their rows
        assert [c.inputs[0].shape[0] for c in triton.calls] == [
            1,
            sum(x.shape[0] for x in inputs[1:]),
        ]
        for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
            r, y = _logits(reply)
            assert r.id == f"id-{i}"
            np.testing.assert_allclose(y[:, 0], x.sum(axis=1), rtol=1e-5)
        await merger.close()

    asyncio.run(scenario())


def test_a_wait_after_a_call_lets_later_requests_join_the_waiting_ones(variant: Variant) -> None:
    """?merge_wait_ms=: once a call ends, the waiting requests wait for more; without it
    they go at once and the later ones make a call of their own."""

    async def scenario(wait_s: float) -> list[int]:
        triton = ScriptedTriton(gated=True)
        merger = ForwardMerger(triton.send, lambda v: 1, limit=1, wait_s=wait_s)
        inputs = _inputs(5, seed=7)
        first = _submit(merger, variant, inputs[:3])  # one alone, two waiting for it
        await asyncio.sleep(0)
        triton.gate.set()
        await first[0]
        await asyncio.sleep(0.02)  # the first reply's client sends its next two requests
        later = [
            asyncio.ensure_future(
                merger.forward(variant, _request(x, f"late-{i}").SerializeToString(), None)
            )
            for i, x in enumerate(inputs[3:])
        ]
        replies = await asyncio.gather(*first, *later)
        for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
            r, y = _logits(reply)
            assert r.id == (f"id-{i}" if i < 3 else f"late-{i - 3}")
            np.testing.assert_allclose(y[:, 0], x.sum(axis=1), rtol=1e-5)
        await merger.close()
        return [c.inputs[0].shape[0] for c in triton.calls]

    rows = [x.shape[0] for x in _inputs(5, seed=7)]
    # waited 0.2 s after the first call: the two late ones joined the two waiting
    assert asyncio.run(scenario(0.2)) == [rows[0], sum(rows[1:])]
    # no wait: the two waiting went when the first call ended; the late two, finding nothing
    # in flight by then, each alone
    assert asyncio.run(scenario(0.0)) == [rows[0], rows[1] + rows[2], rows[3], rows[4]]


def test_a_full_call_does_not_wait(variant: Variant) -> None:
    """Waiting requests that fill max_batch_size go at once, wait or not."""

    async def scenario() -> list[int]:
        triton = ScriptedTriton(gated=True)
        merger = ForwardMerger(triton.send, lambda v: 1, limit=1, wait_s=30.0)
        most = variant.max_batch_size
        x = np.ones((1, 16), np.float32)
        first = asyncio.ensure_future(
            merger.forward(variant, _request(x, "first").SerializeToString(), None)
        )
        waiting = [
            asyncio.ensure_future(
                merger.forward(variant, _request(x, f"w{i}").SerializeToString(), None)
            )
            for i in range(most - 1)
        ]
        await asyncio.sleep(0)
        triton.gate.set()
        await first  # the waiting ones now wait 30 s for more, unless full
        full = asyncio.ensure_future(
            merger.forward(variant, _request(x, "last").SerializeToString(), None)
        )
        await asyncio.wait_for(asyncio.gather(*waiting, full), 5)
        await merger.close()
        return [c.inputs[0].shape[0] for c in triton.calls]

    assert asyncio.run(scenario()) == [1, variant.max_batch_size]


def test_one_bad_request_fails_alone_the_others_are_answered(variant: Variant) -> None:
    async def scenario() -> None:
        triton = ScriptedTriton(gated=True)
        merger = ForwardMerger(triton.send, lambda v: 1, limit=1)
        inputs = _inputs(4, seed=2)
        inputs[2][0, 3] = np.nan
        tasks = _submit(merger, variant, inputs)
        await asyncio.sleep(0)
        triton.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        bad = results[2]
        assert isinstance(bad, UpstreamStatus) and bad.code == "INVALID_ARGUMENT"
        assert "'id-2'" in str(bad)  # Triton's answer about that request, from a call alone
        for i in (0, 1, 3):
            r, y = _logits(results[i])  # type: ignore[arg-type]
            assert r.id == f"id-{i}"
            assert y[0, 2] == inputs[i].shape[0]  # answered by a call of its own rows only
        # the merged call of 1..3 failed, then each of them went alone
        assert [c.id for c in triton.calls] == ["id-0", "", "id-1", "id-2", "id-3"]

    asyncio.run(scenario())


def test_unavailable_merged_call_fails_every_member_for_fallback(variant: Variant) -> None:
    async def scenario() -> None:
        triton = ScriptedTriton(gated=True)
        merger = ForwardMerger(triton.send, lambda v: 1, limit=1)
        tasks = _submit(merger, variant, _inputs(3))
        await asyncio.sleep(0)
        triton.unavailable = True
        triton.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, UpstreamUnavailable) for r in results)
        assert len(triton.calls) == 2  # not re-sent alone: the variant, not a request, failed

    asyncio.run(scenario())


def test_limit_zero_parameters_and_cancelled_waiters(variant: Variant) -> None:
    async def scenario() -> None:
        triton = ScriptedTriton(gated=True)
        off = ForwardMerger(triton.send, lambda v: 1, limit=0)
        inputs = _inputs(3, seed=4)
        tasks = _submit(off, variant, inputs)
        await asyncio.sleep(0)
        assert len(triton.calls) == 3  # never merged, never waiting
        triton.gate.set()
        await asyncio.gather(*tasks)

        triton = ScriptedTriton(gated=True)
        merger = ForwardMerger(triton.send, lambda v: 1, limit=1)
        first = asyncio.ensure_future(
            merger.forward(variant, _request(inputs[0], "a").SerializeToString(), None)
        )
        await asyncio.sleep(0)
        sequence = asyncio.ensure_future(
            merger.forward(
                variant, _request(inputs[1], "s", sequence_id="7").SerializeToString(), None
            )
        )
        gone = asyncio.ensure_future(
            merger.forward(variant, _request(inputs[2], "gone").SerializeToString(), None)
        )
        kept = asyncio.ensure_future(
            merger.forward(variant, _request(inputs[2], "kept").SerializeToString(), None)
        )
        await asyncio.sleep(0)
        assert [c.id for c in triton.calls] == ["a", "s"]  # with parameters: alone, at once
        gone.cancel()  # its client went away while it waited
        triton.gate.set()
        await asyncio.gather(first, sequence, kept)
        assert gone.cancelled()
        assert [c.id for c in triton.calls] == ["a", "s", "kept"]  # not sent for a gone client

    asyncio.run(scenario())


def test_merged_call_has_the_earliest_deadline_then_each_alone_its_own(variant: Variant) -> None:
    async def scenario() -> None:
        seen: list[float | None] = []
        triton = ScriptedTriton(gated=True)

        async def send(v: Variant, payload: bytes, deadline: float | None) -> bytes:
            seen.append(deadline)
            if deadline is not None and len(seen) == 2:
                raise DeadlineExceeded("deadline exceeded")  # the merged call ran out of time
            return await triton.send(v, payload, deadline)

        merger = ForwardMerger(send, lambda v: 1, limit=1)
        inputs = _inputs(3, seed=5)
        now = asyncio.get_running_loop().time()
        deadlines = [None, now + 50.0, now + 5.0]
        tasks = _submit(merger, variant, inputs, deadlines)
        await asyncio.sleep(0)
        triton.gate.set()
        results = await asyncio.gather(*tasks)
        assert seen[1] == now + 5.0  # the merged call: its members' earliest deadline
        assert seen[2:] == [now + 50.0, now + 5.0]  # then each alone, with its own
        assert [_logits(r)[0].id for r in results] == ["id-0", "id-1", "id-2"]

    asyncio.run(scenario())


def test_merge_settings_parse_and_refuse_negatives() -> None:
    from server.errors import ConfigError
    from server.upstreams.base import DEFAULT_MERGE_LIMIT, parse_upstream

    settings = parse_upstream("triton://h:1")[2]
    assert (settings.merge_limit, settings.merge_wait_s) == (DEFAULT_MERGE_LIMIT, 0)
    settings = parse_upstream("triton://h:1?merge=0&merge_wait_ms=1.5")[2]
    assert (settings.merge_limit, settings.merge_wait_s) == (0, 0.0015)
    assert parse_upstream("triton+dns://n:1?merge=3")[2].merge_limit == 3
    for query, needle in (
        ("merge_wait_ms=-5", "merge_wait_ms='-5': must be >= 0"),
        ("merge_wait_ms=nan", "merge_wait_ms='nan': must be >= 0"),
        ("merge=-1", "merge='-1': must be >= 0"),
        ("merge=x", "merge='x': invalid literal"),
    ):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            parse_upstream(f"triton://h:1?{query}")
