import pytest
import torch

from sfprompt.codec import CodecError, Message, decode, encode


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
