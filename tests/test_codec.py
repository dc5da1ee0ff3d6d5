import pytest
import torch

from sfprompt.codec import MAX_PAYLOAD_BYTES, CodecError, Message, decode, encode


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
