"""The body channel across processes on loopback: same replies and bytes as in-process, token, TLS."""

import multiprocessing

import pytest
import torch

from sfprompt.channel import BodyChannelServer, ChannelError, ChannelLink
from sfprompt.codec import Message, ProtocolError
from sfprompt.meter import Meter
from sfprompt.server import BodyServer
from sfprompt.transport import InProcessLink, SessionLink

from conftest import certificates, tiny_split

TOKEN = "s3cret-run-token"
SESSION = "session-of-this-round"
CLIENTS = ("same", "wrong-token", "after-refusals", "bad", "replayer")


def serve_tiny_body(addresses, stop) -> None:
    """In a separate process: the tiny model's body server, until told to stop."""
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"))
    for client in CLIENTS:
        server.admit(client, SESSION)
    with BodyChannelServer(server, "127.0.0.1:0", TOKEN) as channel:
        addresses.put(channel.address)
        stop.wait(60)


@pytest.fixture(scope="module")
def remote_body():
    context = multiprocessing.get_context("spawn")
    addresses, stop = context.Queue(), context.Event()
    process = context.Process(target=serve_tiny_body, args=(addresses, stop), daemon=True)
    process.start()
    yield addresses.get(timeout=60)
    stop.set()
    process.join(10)


def one_batch(link, model, client):
    """A client's two exchanges for one batch in its session; returns the replies."""
    link = SessionLink(link, client, SESSION)
    tokens = torch.randn(2, model.layout.length, model.layout.width, generator=torch.Generator().manual_seed(1))
    rows = link.request(Message("forward", {"tokens": tokens}), "split").tensors["rows"]
    grad = link.request(Message("backward", {"grad": torch.ones_like(rows)}), "split").tensors["grad"]
    return rows, grad


def admitted(model, **kw):
    server = BodyServer(model, Meter(), torch.device("cpu"), **kw)
    for client in CLIENTS:
        server.admit(client, SESSION)
    return server


def test_the_channel_across_processes_answers_as_in_process_and_counts_the_same_bytes(remote_body):
    _, model = tiny_split()
    local_meter, remote_meter = Meter(), Meter()
    local = one_batch(InProcessLink(admitted(model), local_meter, "cpu"), model, "same")
    with ChannelLink(remote_body, TOKEN, remote_meter, torch.device("cpu")) as link:
        remote = one_batch(link, model, "same")
    for a, b in zip(local, remote):
        assert torch.allclose(a, b, atol=1e-6)
    assert remote_meter.counts()["bytes"] == local_meter.counts()["bytes"]


def test_a_wrong_or_missing_token_is_refused_and_the_server_keeps_serving(remote_body):
    _, model = tiny_split()
    for token in ("wrong", ""):
        with ChannelLink(remote_body, token, Meter(), torch.device("cpu")) as link:
            with pytest.raises(ChannelError, match="UNAUTHENTICATED"):
                one_batch(link, model, "wrong-token")
    with ChannelLink(remote_body, TOKEN, Meter(), torch.device("cpu")) as link:
        one_batch(link, model, "after-refusals")


def test_bad_requests_get_a_precise_error(remote_body):
    _, model = tiny_split()
    with ChannelLink(remote_body, TOKEN, Meter(), torch.device("cpu")) as channel:
        link = SessionLink(channel, "bad", SESSION)
        with pytest.raises(ChannelError, match="INVALID_ARGUMENT: tokens of shape"):
            link.request(Message("forward", {"tokens": torch.zeros(2, 3, 4)}), "split")
        with pytest.raises(ChannelError, match="without a pending forward"):
            link.request(Message("backward", {"grad": torch.zeros(2, 1, 64)}), "split")
        with pytest.raises(ChannelError, match="client stranger has no session"):
            SessionLink(channel, "stranger", SESSION).request(Message("forward", {"tokens": torch.zeros(1)}), "split")
        with pytest.raises(ChannelError, match="client bad has no session"):
            SessionLink(channel, "bad", "guessed").request(Message("forward", {"tokens": torch.zeros(1)}), "split")


def test_a_replayed_request_is_refused(remote_body):
    _, model = tiny_split()
    tokens = torch.randn(2, model.layout.length, model.layout.width)
    with ChannelLink(remote_body, TOKEN, Meter(), torch.device("cpu")) as channel:
        captured = Message("forward", {"tokens": tokens}, {"client": "replayer", "session": SESSION, "seq": 1})
        channel.request(captured, "split")
        with pytest.raises(ChannelError, match="replay or out of order"):
            channel.request(captured, "split")


def test_an_abandoned_forward_is_dropped_after_the_timeout():
    _, model = tiny_split()
    server = admitted(model, pending_timeout_s=0.0)
    tokens = torch.randn(2, model.layout.length, model.layout.width)
    server.handle(Message("forward", {"tokens": tokens}, {"client": "same", "session": SESSION, "seq": 1}))
    assert server.pending == 1
    with pytest.raises(ProtocolError, match="without a pending forward"):  # expired before it came
        server.handle(Message("backward", {"grad": torch.ones(2, 1, model.layout.width)},
                              {"client": "same", "session": SESSION, "seq": 2}))
    assert server.pending == 0


def test_tls_when_given_a_certificate():
    _, model = tiny_split()
    ca, certificate, key = certificates()
    server = admitted(model)
    with BodyChannelServer(server, "127.0.0.1:0", TOKEN, certificate=certificate, private_key=key) as channel:
        with ChannelLink(channel.address, TOKEN, Meter(), torch.device("cpu"), root_certificate=ca) as link:
            rows, grad = one_batch(link, model, "same")
        assert rows.shape == (2, 1, model.layout.width)
        with ChannelLink(channel.address, TOKEN, Meter(), torch.device("cpu"), timeout_s=5) as plain:
            with pytest.raises(ChannelError, match="UNAVAILABLE"):  # no plaintext to a TLS server
                one_batch(plain, model, "bad")
