"""--wire-dtype and --shared-rows: what activations and gradients cost on the wire, what they keep, and
that the body server accepts exactly the configured format."""

import pytest
import torch

from sfprompt.codec import Message, ProtocolError, encode
from sfprompt.config import Config, ConfigError
from sfprompt.meter import Meter
from sfprompt.runner import run
from sfprompt.server import BodyServer
from sfprompt.wire import WireFormat

from conftest import tiny_split
from test_model import split_gradients
from test_runner import tiny_config

DTYPES = ["float32", "bfloat16", "float16", "int8"]


def tensor(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype, bound", [("float32", 0.0), ("bfloat16", 2**-8), ("float16", 2**-11), ("int8", 0.5 / 127)])
def test_round_trip_is_within_the_format_precision(dtype, bound):
    wire = WireFormat(dtype)
    x = tensor(4, 7, 64) * 3
    back = wire.unpack(wire.pack("tokens", x), {"tokens": (None, 7, 64)})["tokens"]
    assert back.dtype == torch.float32
    if dtype == "int8":  # at most half a level of each token's own scale
        assert bool(((back - x).abs() <= x.abs().amax(-1, keepdim=True) * bound * 1.0001).all())
        assert bool((back != x).any())
    else:
        assert bool(((back - x).abs() <= x.abs() * bound).all())
        assert torch.equal(back, x) == (dtype == "float32")


def test_bytes_on_the_wire_shrink_with_the_format():
    x = tensor(32, 50, 192)
    size = {dtype: len(encode(Message("forward", WireFormat(dtype).pack("tokens", x)))) for dtype in DTYPES}
    payload = x.numel() * 4
    assert payload < size["float32"] < payload * 1.01
    assert size["bfloat16"] == size["float16"] < payload * 0.51
    assert size["int8"] < payload * (0.25 + 1 / 192 + 0.01)  # a byte an element and a float32 scale per token


def test_int8_keeps_zero_tokens_zero():
    x = torch.zeros(2, 3, 8)
    x[0, 1] = tensor(8)
    wire = WireFormat("int8")
    assert torch.equal(wire.unpack(wire.pack("t", x), {"t": (2, 3, 8)})["t"] == 0, x == 0)


def test_float16_overflow_is_refused_with_the_fix():
    with pytest.raises(ProtocolError, match="bfloat16"):
        WireFormat("float16").pack("tokens", torch.full((1, 2, 4), 1e5))
    WireFormat("bfloat16").pack("tokens", torch.full((1, 2, 4), 1e5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_refuses_what_the_format_does_not_name(dtype):
    wire = WireFormat(dtype)
    good = wire.pack("grad", tensor(2, 1, 8))
    shape = {"grad": (2, 1, 8)}
    wire.unpack(good, shape)
    other = "float32" if dtype != "float32" else "bfloat16"
    bad = [
        WireFormat(other).pack("grad", tensor(2, 1, 8)),  # another format
        {**good, "extra": torch.zeros(1)},
        {k.replace("grad", "rows"): v for k, v in good.items()},
        wire.pack("grad", tensor(2, 2, 8)),  # the wrong shape
    ]
    nonfinite = dict(good)
    if dtype == "int8":
        nonfinite["grad.scale"] = nonfinite["grad.scale"].clone()
        nonfinite["grad.scale"][0, 0, 0] = float("nan")
        negative = {**good, "grad.scale": -good["grad.scale"]}
        low = {**good, "grad": torch.full_like(good["grad"], -128)}
        bad += [negative, low, {"grad": good["grad"]}]
    else:
        nonfinite["grad"] = nonfinite["grad"].clone()
        nonfinite["grad"][0, 0, 0] = float("inf")
    bad.append(nonfinite)
    for tensors in bad:
        with pytest.raises(ProtocolError):
            wire.unpack(tensors, shape)
    with pytest.raises(ProtocolError, match="B >= 1"):  # a batch of no samples
        wire.unpack({k: v[:0] for k, v in good.items()}, {"grad": (None, 1, 8)})


def exchange(split, images, labels):
    """One training step through the message exchange in the split's wire format: the parameter gradients
    and the bytes by phase."""
    grads, costs = split_gradients(split, split.new_params(), images, labels)
    return grads, costs["bytes_by_phase"]


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])  # CLS pooling; average pooling with registers
def test_shared_rows_once_gives_the_same_gradients_for_fewer_bytes(name):
    images, labels = tensor(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    each, each_bytes = exchange(tiny_split(name, prompts=3)[1], images, labels)
    once_split = tiny_split(name, prompts=3, wire=WireFormat(shared_once=True))[1]
    once, once_bytes = exchange(once_split, images, labels)
    for key in each:
        assert torch.allclose(once[key], each[key], atol=1e-6, rtol=1e-5), key
    layout = once_split.layout
    shared = layout.prefix + layout.prompts
    saved_up = (len(images) - 1) * shared * layout.width * 4  # the shared rows of every sample but one
    saved_down = (len(images) - 1) * layout.prompts * layout.width * 4
    header = 128  # the second tensor's name, dtype and shape in the header
    assert saved_up - header <= each_bytes["up/split"] - once_bytes["up/split"] <= saved_up
    assert saved_down - header <= each_bytes["down/split"] - once_bytes["down/split"] <= saved_down


def test_shared_rows_once_changes_nothing_with_client_blocks():
    split = tiny_split(client_blocks=1, wire=WireFormat(shared_once=True))[1]
    assert not split.messages.shares_rows
    tokens = tensor(2, split.layout.length, split.layout.width)
    messages = split.messages
    assert set(messages.pack_tokens(tokens)) == {"tokens"} and torch.equal(messages.unpack_tokens(messages.pack_tokens(tokens)), tokens)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_compact_formats_give_close_gradients(dtype):
    images, labels = tensor(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    exact, exact_bytes = exchange(tiny_split()[1], images, labels)
    close, close_bytes = exchange(tiny_split(wire=WireFormat(dtype, shared_once=True))[1], images, labels)
    for key in exact:
        error = float((close[key] - exact[key]).norm() / exact[key].norm())
        assert 0 < error < 0.05, (key, error)
    assert close_bytes["up/split"] < exact_bytes["up/split"] * 0.5


def test_the_server_refuses_another_format():
    split = tiny_split(wire=WireFormat("bfloat16", shared_once=True))[1]
    server = BodyServer(split, Meter(), torch.device("cpu"))
    meta = {"client": "0", "session": server.admit("0")}
    tokens = split.send(tensor(2, 3, 32, 32), split.new_params().prompts, None)
    for seq, tensors in enumerate([{"tokens": tokens}, WireFormat("bfloat16").pack("tokens", tokens),
                                   WireFormat("float32", True).pack("tokens", tokens)], start=1):
        with pytest.raises(ProtocolError):
            server.handle(Message("forward", tensors, meta | {"seq": seq}))
    rows = server.handle(Message("forward", split.messages.pack_tokens(tokens), meta | {"seq": 9})).tensors["rows"]
    assert rows.dtype == torch.bfloat16
    with pytest.raises(ProtocolError, match="dtype"):
        server.handle(Message("backward", {"grad": rows.float()}, meta | {"seq": 10}))


def test_options_are_validated():
    with pytest.raises(ConfigError, match="--wire-dtype must be one of"):
        Config(wire_dtype="fp8")
    with pytest.raises(ConfigError, match="--shared-rows must be one of"):
        Config(shared_rows="never")


def test_a_run_in_a_compact_format_trains_for_fewer_bytes(imagefolder, tmp_path):
    quiet = dict(progress=False, log=lambda _: None)
    exact = run(tiny_config(imagefolder, tmp_path, rounds=1, wire_dtype="float32", shared_rows="per-sample",
                            out=str(tmp_path / "a")), **quiet)  # the paper's format
    compact = run(tiny_config(imagefolder, tmp_path, rounds=1, wire_dtype="int8", shared_rows="once",
                              out=str(tmp_path / "b")), **quiet)
    assert compact["config"]["wire_dtype"] == "int8" and compact["config"]["shared_rows"] == "once"
    assert abs(compact["final_accuracy"] - exact["final_accuracy"]) <= 0.25  # it trains (tiny data: coarse)
    assert compact["bytes_up"] < exact["bytes_up"] * 0.5 and compact["bytes_down"] < exact["bytes_down"] * 0.5
