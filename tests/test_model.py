import pytest
import torch
import torch.nn.functional as F

from sfprompt.codec import Message
from sfprompt.defence import Defence
from sfprompt.config import ConfigError
from sfprompt.meter import Meter
from sfprompt.model import SplitViT, create_vit
from sfprompt.server import BodyServer
from sfprompt.transport import InProcessLink, SessionLink

from conftest import SHARED_WEIGHTS, tiny_split


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])  # CLS pooling; average pooling with registers
@pytest.mark.parametrize("client_blocks", [0, 2])
def test_split_without_prompts_equals_timm(name, client_blocks):
    vit, split = tiny_split(name, prompts=0, client_blocks=client_blocks)
    params = split.new_params()
    vit.head.load_state_dict(params.tail.head.state_dict())  # the split reseeds the classifier
    images = torch.randn(5, 3, 32, 32)
    expected = vit(images)
    with torch.no_grad():
        assert torch.allclose(split.logits(images, params), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])
def test_prompts_do_not_enter_pooling(name):
    """Prompts change the output only through attention, never by being pooled."""
    _, split = tiny_split(name, prompts=4)
    tokens = split.body(split.head(torch.randn(2, 3, 32, 32), split.new_params().prompts))
    layout = split.layout
    assert tokens.shape == (2, layout.length, layout.width)
    rows = range(layout.length)[layout.tail_rows]
    assert not set(rows) & set(range(layout.length)[layout.prompt_rows])


def split_gradients(split, params, images, labels):
    """One training step's gradients computed through the client/server message exchange, in the split's
    wire format, and what it cost (the meter's counts)."""
    meter = Meter()
    server = BodyServer(split, meter, torch.device("cpu"))
    link = SessionLink(InProcessLink(server, meter, torch.device("cpu")), 0, server.admit("0"))
    tokens = split.send(images, params.prompts, torch.Generator().manual_seed(0))  # the head, and any defence
    messages = split.messages
    reply = link.request(Message("forward", messages.pack_tokens(tokens)), "split")
    rows = messages.unpack_rows(reply.tensors, len(images)).requires_grad_(True)
    F.cross_entropy(params.tail(rows), labels).backward()
    reply = link.request(Message("backward", messages.pack_grad(rows.grad)), "split")
    messages.sent_rows(tokens).backward(messages.unpack_input_grad(reply.tensors, tokens))
    return {name: p.grad.clone() for name, p in params.named_parameters()}, meter.take()


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])
@pytest.mark.parametrize("client_blocks", [0, 2])
@pytest.mark.parametrize("pooled_and_shuffled", [False, True])
def test_split_gradients_equal_end_to_end_autograd(name, client_blocks, pooled_and_shuffled):
    """Also through the pooling and shuffling defences: shuffling leaves the output alone (attention is
    blind to order once positions are embedded), so the exchange gives the unshuffled model's gradients."""
    _, split = tiny_split(name, prompts=3, client_blocks=client_blocks,
                          pool_tokens=1 if pooled_and_shuffled else 0, defence=Defence(shuffle=pooled_and_shuffled))
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])

    reference = split.new_params()
    tokens = split.body(split.head(images, reference.prompts))
    F.cross_entropy(reference.tail(tokens[:, split.layout.tail_rows]), labels).backward()

    grads, costs = split_gradients(split, split.new_params(), images, labels)
    for pname, param in reference.named_parameters():
        assert torch.allclose(grads[pname], param.grad, atol=1e-6, rtol=1e-4), pname
    assert grads["prompts"].abs().sum() > 0
    assert costs["bytes_up"] > 0 and costs["bytes_down"] > 0
    assert costs["server_flops"] > 0


def test_server_returns_only_what_the_client_needs():
    _, split = tiny_split("test_vit", prompts=3, client_blocks=0)
    _, costs = split_gradients(split, split.new_params(), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    layout = split.layout
    # Up: all tokens (4 x L x D) and the CLS-row gradient (4 x 1 x D); down: the CLS rows and the prompt-row gradient.
    up_floats = 4 * layout.length * layout.width + 4 * layout.width
    down_floats = 4 * layout.width + 4 * layout.prompts * layout.width
    assert 4 * up_floats < costs["bytes_up"] < 4 * up_floats + 1024
    assert 4 * down_floats < costs["bytes_down"] < 4 * down_floats + 1024


def test_frozen_parts_have_no_trainable_parameters():
    _, split = tiny_split()
    assert not any(p.requires_grad for p in split.head.parameters())
    assert not any(p.requires_grad for p in split.body.parameters())
    params = split.new_params()
    assert all(p.requires_grad for p in params.parameters())
    assert params.prompts.shape == (1, 3, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model="vit_nonexistent_patch16"), "unknown model"),
        (dict(image_size=50), "not divisible by the patch size"),
        (dict(weights="/no/such/file.safetensors"), "does not exist"),
    ],
)
def test_bad_model_options_are_named(kwargs, message):
    options = dict(model="test_vit", num_classes=4, image_size=32, weights="none") | kwargs
    with pytest.raises(ConfigError, match=message):
        create_vit(**options)


@pytest.mark.parametrize("name, message", [("deit_tiny_distilled_patch16_224", "distilled ViTs"),
                                           ("vit_base_patch16_siglip_224", "pooling 'map'")])
def test_vits_the_split_does_not_handle_are_refused_up_front(name, message):
    with pytest.raises(ConfigError, match=message):
        SplitViT(create_vit(name, 4, 32, "none"), 2, 0, 0)


def test_client_blocks_beyond_depth_is_refused():
    with pytest.raises(ConfigError, match="client-blocks"):
        tiny_split(client_blocks=6)


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason=f"real checkpoint not found at {SHARED_WEIGHTS}")
def test_weights_not_matching_the_model_are_refused():
    with pytest.raises(ConfigError, match="does not match model"):
        create_vit("vit_base_patch16_224", num_classes=10, image_size=32, weights=str(SHARED_WEIGHTS))


def test_a_client_process_can_free_the_body_and_still_run_its_head():
    vit, model = tiny_split(client_blocks=1)
    depth = len(vit.blocks)
    images = torch.randn(2, 3, 32, 32)
    before = model.head(images, model.initial_params.prompts)
    model.drop_body()
    assert model.body is None and len(vit.blocks) == 1 and depth > 1
    assert torch.equal(model.head(images, model.initial_params.prompts), before)
