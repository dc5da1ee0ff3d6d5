"""Thousands of random and mutated payloads against the decoder and the body server's handler.

Every one must be either a valid request or refused with `CodecError` / `ProtocolError`: no other
exception, no hang, no state left behind, no growth of what the server holds.
"""

import json
import struct
import time

import numpy as np
import pytest
import torch

from sfprompt.codec import CodecError, Message, ProtocolError, decode, encode
from sfprompt.meter import Meter
from sfprompt.model import SplitViT
from sfprompt.server import BodyServer
from sfprompt.wire import WireFormat
from sfprompt.zeroth_order import Perturbations

from conftest import tiny_split

SESSION = "fuzz-session"


def valid_requests(model, rng):
    """Well-formed forwards and backwards of a few clients, to be mutated."""
    length, width = model.layout.length, model.layout.width
    for seq in range(1, 4):
        batch = int(rng.integers(1, 4))
        yield Message("forward", {"tokens": torch.randn(batch, length, width)}, {"client": "a", "session": SESSION, "seq": seq})
        yield Message("backward", {"grad": torch.randn(batch, 1, width)}, {"client": "a", "session": SESSION, "seq": seq})


def mutations(payload: bytes, rng) -> bytes:
    data = bytearray(payload)
    choice = rng.integers(0, 6)
    if choice == 0:  # flip random bytes
        for i in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[i] ^= int(rng.integers(1, 256))
    elif choice == 1:  # truncate
        data = data[: int(rng.integers(0, len(data)))]
    elif choice == 2:  # append garbage
        data += rng.bytes(int(rng.integers(1, 64)))
    elif choice == 3:  # lie about the header length
        data[:8] = struct.pack("<Q", int(rng.integers(0, 2**63)))
    elif choice == 4:  # rewrite a shape or offset in the header to a huge number
        header_len = struct.unpack("<Q", data[:8])[0]
        header = bytes(data[8 : 8 + header_len]).replace(b"[", b"[99999999", 1)
        data = bytearray(struct.pack("<Q", len(header)) + header + bytes(data[8 + header_len :]))
    else:  # pure noise
        data = bytearray(rng.bytes(int(rng.integers(0, 512))))
    return bytes(data)


def crafted(model, rng):
    """Well-formed payloads with bad content: shapes, dtypes, values, kinds, sessions, replays."""
    length, width = model.layout.length, model.layout.width
    good = {"client": "b", "session": SESSION}
    tensors = [torch.randn(2, length, width).double(), torch.full((2, length, width), float("nan")),
               torch.randn(2, length + 1, width), torch.randn(0, length, width), torch.randn(5000, 1, 1),
               torch.randint(0, 9, (2, length, width)), torch.randn(2, length, width).half(), torch.randn(())]
    metas = [{}, {"client": None}, {"client": True, "session": SESSION, "seq": 1}, {**good, "seq": "1"},
             {**good, "seq": 0}, {**good, "seq": -4}, {"client": "b", "session": "nope", "seq": 10**6},
             {"client": ["b"], "session": SESSION, "seq": 10**6}]
    kinds = ["forward", "backward", "global", "", "forward\x00"]
    names = ["tokens", "grad", "x"]
    seq = 10
    for _ in range(200):
        seq += 1
        meta = metas[rng.integers(len(metas))] if rng.random() < 0.3 else {**good, "seq": seq}
        tensor = tensors[rng.integers(len(tensors))]
        extra = {"smuggled": torch.zeros(1)} if rng.random() < 0.1 else {}
        yield Message(kinds[rng.integers(len(kinds))], {names[rng.integers(len(names))]: tensor, **extra}, meta)


def test_no_payload_crashes_hangs_or_leaks_in_the_body_server():
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), max_batch=64)
    rng = np.random.default_rng(0)
    payloads = [encode(m) for m in valid_requests(model, rng)]
    payloads += [mutations(payloads[i % len(payloads)], rng) for i in range(3000)]
    payloads += [encode(m) for m in crafted(model, rng)]
    payloads += [b"", b"\x00" * 8, struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 4) + b"null",
                 struct.pack("<Q", 30) + json.dumps({"__metadata__": {"sfprompt": "[]"}}).encode()[:30]]
    outcomes = {"accepted": 0, "codec": 0, "protocol": 0}
    slowest = 0.0
    for i, payload in enumerate(payloads):
        if i % 500 == 0:  # fresh sessions now and then, so sequence numbers do not exhaust the fuzz
            server.end_round()
            server.admit("a", SESSION)
            server.admit("b", SESSION)
        started = time.perf_counter()
        try:
            server.handle(decode(payload))
            outcomes["accepted"] += 1
        except CodecError:
            outcomes["codec"] += 1
        except ProtocolError:
            outcomes["protocol"] += 1
        slowest = max(slowest, time.perf_counter() - started)
        assert server.pending <= 2  # at most one forward per admitted client is ever held
    assert sum(outcomes.values()) == len(payloads)
    assert outcomes["codec"] > 1000 and outcomes["protocol"] > 100 and outcomes["accepted"] >= 3
    assert slowest < 2.0  # no payload makes the server work long


def test_the_decoder_refuses_oversized_payloads_before_reading_them():
    payload = encode(Message("forward", {"tokens": torch.zeros(1000)}))
    try:
        decode(payload, max_bytes=100)
    except CodecError as err:
        assert "exceeds the 100-byte limit" in str(err)
    else:
        raise AssertionError("an oversized payload was decoded")


def test_no_evaluate_crashes_or_leaves_anything_held():
    """Forward-only's `evaluate` (a forward's tensors and the seed of its directions): valid, mutated and crafted ones
    (a seed missing, negative, too large, not an integer; a checksum that is not the seed's; a tensor missing or
    smuggled; wrong rows) are answered or refused with `CodecError` / `ProtocolError`, and none leaves anything
    pending."""
    _, tiny = tiny_split(wire=WireFormat(shared_once=True))
    model = SplitViT(tiny._vit, tiny.layout.prompts, 0, 0, wire=WireFormat(shared_once=True),
                     perturbations=Perturbations(1, 0.1, "antithetic"))
    server = BodyServer(model, Meter(), torch.device("cpu"), max_batch=64)
    rng = np.random.default_rng(1)
    patches, shared_rows, width = model.layout.patches, model.layout.patch_rows.start, model.layout.width
    good = {"client": "a", "session": SESSION}
    tensors = {"tokens": torch.randn(2, patches, width), "shared": torch.randn(shared_rows, width)}
    seeded = lambda seed, prompts=tensors["shared"][model.layout.prompt_rows]: model.messages.evaluate_meta(  # noqa: E731
        seed, model.perturbations.draw(seed, prompts.shape))
    valid = [Message("evaluate", tensors, {**good, "seq": s, **seeded(s)}) for s in (1, 2, 3)]
    crafted_ = [Message("evaluate", tensors, {**good, "seq": 10 + i, **meta}) for i, meta in enumerate([
        {}, {"directions-seed": -1, "directions-sum": 0.0}, {"directions-seed": 2**40, "directions-sum": 0.0},
        {"directions-seed": 1.5, "directions-sum": 0.0}, {"directions-seed": None}, {**seeded(5), "directions-sum": 1.0},
        {"directions-seed": 5}])]
    crafted_ += [Message("evaluate", {"tokens": tensors["tokens"]}, {**good, "seq": 30, **seeded(6)}),
                 Message("evaluate", {**tensors, "grad": torch.zeros(1)}, {**good, "seq": 31, **seeded(6)}),
                 Message("evaluate", {"tokens": torch.randn(2, patches + 1, width), "shared": tensors["shared"]},
                         {**good, "seq": 32, **seeded(6)}),
                 Message("evaluate", {"tokens": tensors["tokens"], "shared": torch.randn(2, shared_rows, width)},
                         {**good, "seq": 33, **seeded(6)})]
    assert_evaluates_are_answered_or_refused(server, valid, crafted_, rng)


def test_no_evaluate_of_a_head_with_blocks_crashes_or_leaves_anything_held():
    """With client blocks an `evaluate` carries every row of every sample (residual's one set, perturbed on the
    client) and no seed: one that names directions, smuggles or misses a tensor, or has wrong rows is refused."""
    _, tiny = tiny_split()
    model = SplitViT(tiny._vit, tiny.layout.prompts, 1, 0, perturbations=Perturbations(1, 0.1, "residual"))
    server = BodyServer(model, Meter(), torch.device("cpu"), max_batch=64)
    length, width = model.layout.length, model.layout.width
    good, tokens = {"client": "a", "session": SESSION}, torch.randn(2, length, width)
    valid = [Message("evaluate", {"tokens": tokens}, {**good, "seq": s}) for s in (1, 2, 3)]
    crafted_ = [Message("evaluate", {"tokens": tokens}, {**good, "seq": 10, "directions-seed": 5}),
                Message("evaluate", {"tokens": tokens}, {**good, "seq": 11, "directions-sum": 0.0}),
                Message("evaluate", {"tokens": tokens, "shared": torch.randn(2, width)}, {**good, "seq": 12}),
                Message("evaluate", {"tokens": tokens[:, 1:].clone()}, {**good, "seq": 13}),
                Message("evaluate", {}, {**good, "seq": 14})]
    assert_evaluates_are_answered_or_refused(server, valid, crafted_, np.random.default_rng(2))


def assert_evaluates_are_answered_or_refused(server, valid, crafted_, rng):
    """Each valid evaluate answered, each crafted one refused, and 600 mutations of the valid ones either: none
    crashes the server or leaves anything pending, and no backward ever runs."""
    server.admit("a", SESSION)
    for message in valid:
        server.handle(decode(encode(message)))
    for message in crafted_:
        with pytest.raises((CodecError, ProtocolError)):
            server.handle(decode(encode(message)))
    payloads = [encode(m) for m in valid + crafted_]
    payloads += [mutations(payloads[i % 3], rng) for i in range(600)]
    outcomes = {"accepted": 0, "refused": 0}
    for i, payload in enumerate(payloads):
        if i % 200 == 0:
            server.end_round()
            server.admit("a", SESSION)
        try:
            server.handle(decode(payload))
            outcomes["accepted"] += 1
        except (CodecError, ProtocolError):
            outcomes["refused"] += 1
        assert server.pending == 0 and server.passes["backward"] == 0
    assert outcomes["accepted"] >= 3 and outcomes["refused"] > len(crafted_)
