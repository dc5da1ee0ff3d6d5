"""Client failures: a client that raises, hangs or loses the body server is dropped; the round goes on."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.methods import Method
from sfprompt import checkpoint
from sfprompt.channel import BodyChannelServer, ChannelLink
from sfprompt.client import Client, ClientFailure
from sfprompt.codec import Message, ProtocolError, decode, encode
from sfprompt.meter import Meter
from sfprompt.federation import prepare
from sfprompt.runner import RoundFailed, run
from sfprompt.server import BodyServer
from sfprompt.transport import InProcessLink

from test_runner import tiny_config

def quiet(config):
    return run(config, progress=False, log=lambda _: None)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("phase", ["local", "prune", "split"])
def test_a_client_that_raises_in_any_phase_is_dropped_and_the_rest_are_averaged(imagefolder, tmp_path, monkeypatch, phase):
    config = tiny_config(imagefolder, tmp_path, rounds=1, clients=3, clients_per_round=3)
    loader, request = Client._loader, InProcessLink.request

    def failing_loader(self, data, ctx, shuffle=True):
        if self.cid == 1 and ctx.phase == phase:
            raise RuntimeError("disk on fire")
        return loader(self, data, ctx, shuffle)

    def failing_backward(self, message, phase_, memory=None):  # after the server holds a forward for client 1
        if message.kind == "backward" and message.meta["client"] == 1:
            raise RuntimeError("disk on fire")
        return request(self, message, phase_, memory)

    if phase == "split":
        monkeypatch.setattr(InProcessLink, "request", failing_backward)
    else:
        monkeypatch.setattr(Client, "_loader", failing_loader)
    averaged, forgotten = [], []
    monkeypatch.setattr(Method, "aggregate", lambda self, current, states, weights, settings:
                        averaged.append(weights) or dict(states[0]))
    forget = BodyServer.forget
    monkeypatch.setattr(BodyServer, "forget", lambda self, c: forgotten.append((c, self.pending)) or forget(self, c))
    quiet(config)
    record = records(tmp_path / "run")[0]
    assert record["dropped"] == [{"client": 1, "phase": phase, "reason": "RuntimeError: disk on fire"}]
    assert averaged == [[12, 12]]  # clients 0 and 2 only
    assert forgotten == [("1", 1 if phase == "split" else 0)]  # the server frees what it held for client 1


def test_forget_frees_a_failed_clients_pending_forward_and_body_copy(imagefolder, tmp_path):
    fed = prepare(tiny_config(imagefolder, tmp_path, method="sfl", train_body=True))
    server = BodyServer(fed.model, Meter(), torch.device("cpu"), body_optimizer=lambda body: torch.optim.SGD(body.parameters(), 0.1))
    tokens = torch.randn(2, fed.model.layout.length, fed.model.layout.width)
    meta = {"client": "7", "session": server.admit("7"), "seq": 1}
    server.handle(Message("forward", fed.model.messages.pack_tokens(tokens), meta))  # the run's wire format
    assert server.pending == 1 and "7" in server._copies
    server.forget("7")
    assert server.pending == 0 and "7" not in server._copies
    before = {k: v.clone() for k, v in fed.model.body.state_dict().items()}
    server.end_round()  # nothing of the failed client's copy is averaged in
    assert all(torch.equal(before[k], v) for k, v in fed.model.body.state_dict().items())


def test_a_non_finite_gradient_is_refused_before_it_steps_a_trained_body(imagefolder, tmp_path):
    fed = prepare(tiny_config(imagefolder, tmp_path, method="sfl", train_body=True))
    server = BodyServer(fed.model, Meter(), torch.device("cpu"), body_optimizer=lambda body: torch.optim.SGD(body.parameters(), 0.1))
    meta = {"client": "7", "session": server.admit("7")}
    tokens = torch.randn(2, fed.model.layout.length, fed.model.layout.width)
    rows = server.handle(Message("forward", fed.model.messages.pack_tokens(tokens), {**meta, "seq": 1})).tensors["rows"]
    body = server._copies["7"][0]
    before = {k: v.clone() for k, v in body.state_dict().items()}
    with pytest.raises(ProtocolError, match="non-finite"):
        server.handle(Message("backward", {"grad": torch.full_like(rows, float("nan"))}, {**meta, "seq": 2}))
    assert all(torch.equal(before[k], v) for k, v in body.state_dict().items())


def test_a_client_past_the_timeout_is_dropped(imagefolder, tmp_path, monkeypatch):
    original = Client._loader

    def slow(self, data, ctx, shuffle=True):
        for batch in original(self, data, ctx, shuffle):
            if self.cid == 0:
                time.sleep(1.0)  # six batches a round: twice the limit, which the others meet even on a busy machine
            yield batch

    monkeypatch.setattr(Client, "_loader", slow)
    quiet(tiny_config(imagefolder, tmp_path, rounds=1, clients=3, clients_per_round=3, client_timeout_s=3.0))
    (dropped,) = records(tmp_path / "run")[0]["dropped"]
    assert dropped["client"] == 0 and "ClientTimeout" in dropped["reason"]


def test_too_few_survivors_stop_the_run_with_a_clear_error_and_a_resumable_checkpoint(imagefolder, tmp_path, monkeypatch):
    config = tiny_config(imagefolder, tmp_path, rounds=2, clients=3, clients_per_round=3, min_clients=2)
    original, calls = Client.run_round, []

    def failing_in_round_2(self, *args):
        calls.append(self.cid)
        if len(calls) > 3 and self.cid != 0:
            raise ClientFailure(self.cid, "split", "gone")
        return original(self, *args)

    monkeypatch.setattr(Client, "run_round", failing_in_round_2)
    with pytest.raises(RoundFailed, match="round 2: 1 of 3 clients finished, fewer than --min-clients 2"):
        quiet(config)
    assert checkpoint.load(tmp_path / "run").round == 1


def test_a_client_whose_body_server_disappears_fails_in_the_split_phase(imagefolder, tmp_path):
    fed = prepare(tiny_config(imagefolder, tmp_path, method="sfl"))
    channel = BodyChannelServer(BodyServer(fed.model, Meter(), torch.device("cpu")), "127.0.0.1:0", "t")
    address = channel.address
    channel.stop()  # the server is gone (or the network is)
    global_state = Message("global", dict(fed.method.new_params(fed.model).state_dict()))
    with ChannelLink(address, "t", Meter(), torch.device("cpu"), timeout_s=5) as link:
        with pytest.raises(ClientFailure) as failure:
            fed.clients[0].run_round(fed.method, global_state, link, seed=0)
    assert failure.value.phase == "split" and "UNAVAILABLE" in failure.value.reason


@pytest.mark.parametrize("method", ["sfprompt", "sl"])
@pytest.mark.parametrize("corrupt", ["nan", "shape", "extra", "count"])
def test_a_malformed_upload_is_dropped_not_averaged(imagefolder, tmp_path, monkeypatch, corrupt, method):
    """Also in sequential split learning, where the next client starts from an upload: the first client's
    bad upload is dropped before anyone uses it, so the clients after it are unharmed."""
    original = Client.run_round

    def corrupting(self, *args):
        payload = original(self, *args)
        update = decode(payload)
        if self.cid == 0:
            name = next(iter(update.tensors))
            if corrupt == "nan":
                update.tensors[name] = torch.full_like(update.tensors[name], float("nan"))
            elif corrupt == "shape":
                update.tensors[name] = update.tensors[name][..., :1]
            elif corrupt == "extra":
                update.tensors["smuggled"] = torch.zeros(3)
            else:
                update.meta["num_examples"] = -5
        return encode(update)

    monkeypatch.setattr(Client, "run_round", corrupting)
    quiet(tiny_config(imagefolder, tmp_path, method=method, rounds=1, clients=3, clients_per_round=3))
    (dropped,) = records(tmp_path / "run")[0]["dropped"]
    assert dropped["client"] == 0 and dropped["phase"] == "upload"
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "global.safetensors").values())
