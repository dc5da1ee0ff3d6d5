import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sfprompt.codec import MAX_PAYLOAD_BYTES, CodecError, Message, ShapesOnly, decode, encode, encoded_size


def test_roundtrip_keeps_tensors_and_meta():
    message = Message("forward", {"tokens": torch.randn(2, 5, 8), "ids": torch.arange(3)}, {"client": 7, "note": "x"})
    back = decode(encode(message))
    assert back.kind == "forward" and back.meta == {"client": 7, "note": "x"}
    assert torch.equal(back.tensors["tokens"], message.tensors["tokens"])
    assert back.tensors["ids"].dtype == torch.int64


def test_size_is_the_raw_buffers_plus_a_small_header():
    payload = encode(Message("rows", {"rows": torch.zeros(16, 1, 384)}))
    assert 16 * 384 * 4 < len(payload) < 16 * 384 * 4 + 256


def test_non_contiguous_tensors_are_encoded():
    tensor = torch.randn(4, 6)[:, ::2]
    assert torch.equal(decode(encode(Message("m", {"t": tensor}))).tensors["t"], tensor)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"\xff" * 64, encode(Message("m"))[:-1] + b"}x"])
def test_malformed_payloads_are_refused(payload):
    with pytest.raises(CodecError):
        decode(payload)


def test_payload_without_sfprompt_header_is_refused():
    from safetensors.torch import save

    with pytest.raises(CodecError, match="no sfprompt header"):
        decode(save({"t": torch.zeros(2)}))


def test_the_size_limit_follows_what_the_model_sends():
    """`fl` with ViT-B broadcasts 343 MB, more than the codec's default limit: the run's own limit,
    derived from its model and method, lets exactly that through and refuses more."""
    from sfprompt.meter import DOWN, Meter
    from sfprompt.methods import METHODS
    from sfprompt.model import SplitViT, create_vit
    from sfprompt.server import BodyServer
    from sfprompt.transport import InProcessLink

    model = SplitViT(create_vit("vit_base_patch16_224", 10, 32, "none"), 10, 0, 0)
    state = dict(METHODS["fl"]().new_params(model).state_dict())
    limit = model.messages.max_bytes(batch_size=32, state_bytes=METHODS["fl"]().state_bytes(model))
    link = InProcessLink(BodyServer(model, Meter(), torch.device("cpu")), Meter(), torch.device("cpu"), limit)
    assert len(encode(Message("global", state))) > MAX_PAYLOAD_BYTES
    assert link.send(Message("global", state), DOWN, "broadcast").tensors.keys() == state.keys()
    state["smuggled"] = torch.zeros(2 * 1024 * 1024)  # 8 MB more than the model
    with pytest.raises(CodecError, match="exceeds"):
        link.send(Message("global", state), DOWN, "broadcast")
    assert model.messages.max_bytes(32, model.params_bytes) < limit  # a split method sends prompts, tail, activations


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool, torch.uint8, torch.int32,
          torch.float64, torch.int16]


def test_encoded_size_is_the_encoded_length():
    """`encoded_size` (what a message of fake tensors is counted as) equals the length of the real encoding, for
    messages of every dtype safetensors lays out, in any mix, names and metadata that need escaping included."""
    generator = torch.Generator().manual_seed(0)

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator))

    for _ in range(500):
        tensors = {f"{['rows', 'grad', 't.w', 'a_scale'][draw(4)]}{draw(50)}":
                   torch.zeros([draw(30) for _ in range(draw(4))], dtype=DTYPES[draw(len(DTYPES))]) for _ in range(draw(6))}
        message = Message(["forward", "update"][draw(2)], tensors, {"client": draw(10**6), "s": 'é"\\' * draw(3)})
        assert encoded_size(message) == len(encode(message))


def test_a_message_of_fake_tensors_is_counted_not_serialised():
    with FakeTensorMode():
        fake = {"rows": torch.empty(4, 1, 384), "levels": torch.empty(4, 9, 384, dtype=torch.int8)}
    message = Message("body_output", fake, {"client": 3})
    payload = encode(message)
    real = Message("body_output", {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in fake.items()}, {"client": 3})
    assert isinstance(payload, ShapesOnly) and len(payload) == len(encode(real))
    back = decode(payload)
    assert back.kind == "body_output" and back.meta == {"client": 3} and back.wire_bytes == len(payload)
    assert {name: (t.shape, t.dtype) for name, t in back.tensors.items()} == {n: (t.shape, t.dtype) for n, t in fake.items()}
    assert all(back.tensors[name] is not fake[name] for name in fake)  # the receiver's own copies
    with pytest.raises(CodecError, match="limit"):
        decode(payload, max_bytes=len(payload) - 1)
