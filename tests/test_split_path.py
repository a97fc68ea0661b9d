"""Split inference through a real server equals the unsplit model, for every split point."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
from conftest import Broker
from harness import basicmotions_plan, bundle_tokenizer, server_config, spawn

from edgetok.frames import FrameHeader, TailReply, encode_frame
from edgetok.models.runtime import Runtime

pytestmark = pytest.mark.slow


async def _roundtrip(port: int, frames: list[bytes], n: int) -> list[TailReply]:
    async with aiomqtt.Client("127.0.0.1", port,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("edgetok/gw-split/downlink", qos=1)
        for f in frames:
            await client.publish("edgetok/uplink/gw-split", f, qos=1)
        replies: list[TailReply] = []
        async with asyncio.timeout(60):
            async for msg in client.messages:
                replies.append(TailReply.decode(bytes(msg.payload)))  # type: ignore[arg-type]
                if len(replies) == n:
                    break
        return replies


def test_tail_over_the_wire_equals_full_model_for_every_split(
        tmp_path: Path, mosquitto: Broker, tiny_bundle: Path) -> None:
    server = spawn("server", server_config(tiny_bundle, mosquitto.port), tmp_path,
                   "server").start()
    try:
        rt = Runtime(tiny_bundle)
        m = rt.manifest
        plan = basicmotions_plan(limit=8)
        tok = bundle_tokenizer(m)
        t = np.stack([plan.timestamps(j) for j in range(len(plan.x))])
        tokens = tok.tokenize_array(plan.x.astype(np.float32), t).model_input()
        frames, expected = [], {}
        remote = [v for v in m.variants if v.split < m.num_layers]
        assert {v.split for v in remote} == set(range(m.num_layers))
        for vi, v in enumerate(remote):
            full = rt.full(m.device_variant(v.pruning_ratio).id, tokens)
            feats = rt.run(v.id, "head", tokens) if v.head else tokens
            for j in range(len(tokens)):
                seq = vi * 1000 + j
                hdr = FrameHeader(gateway="gw-split", bundle=m.bundle_id, variant=v.id,
                                  stream="imu", window=seq, start_ts=0.0, end_ts=1.0,
                                  deadline_ts=time.time() + 60, sent_ts=time.time(),
                                  precision="fp32", shape=tuple(feats[j:j + 1].shape))
                frames.append(encode_frame(hdr, feats[j:j + 1]))
                expected[seq] = full[j]
        replies = asyncio.run(_roundtrip(mosquitto.port, frames, len(frames)))
        assert len(replies) == len(frames)
        for r in replies:
            assert r.error is None
            np.testing.assert_allclose(np.array(r.logits), expected[r.window], atol=1e-4)
    finally:
        assert server.stop() == 0
