"""The batching body server: concurrent clients' requests run as one batch, each client gets exactly
its own answer (to float tolerance) and its own FLOPs, and a slow, failed or malformed client
delays or corrupts no one else."""

import threading
import time

import pytest
import torch

from sfprompt.channel import BodyChannelServer, ChannelLink
from sfprompt.codec import Message, ProtocolError
from sfprompt.config import ConfigError
from sfprompt.meter import Meter
from sfprompt.model import SplitViT
from sfprompt.server import BodyServer
from sfprompt.transport import SessionLink

from conftest import run_python_benchmark, tiny_split

SIZES = (1, 2, 3, 5)  # each client's batch, different on purpose


def tokens_of(model, client: int, samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + client)
    return torch.randn(samples, model.layout.length, model.layout.width, generator=generator)


def grad_of(rows: torch.Tensor, client: int) -> torch.Tensor:
    return torch.randn(rows.shape, generator=torch.Generator().manual_seed(200 + client))


class Session:
    """A client's stamped requests to one server."""

    def __init__(self, server: BodyServer, client: int, client_blocks: int | None = None) -> None:
        self.server, self.client, self.seq = server, str(client), 0
        self.session = server.admit(str(client), client_blocks=client_blocks)

    def request(self, kind: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.seq += 1
        reply = self.server.handle(Message(kind, {name: tensor}, {"client": self.client, "session": self.session,
                                                                   "seq": self.seq}))
        return next(iter(reply.tensors.values()))


def counting_body_calls(server: BodyServer) -> list[int]:
    """Wraps the body so that each call records its batch size."""
    calls, forward = [], server.body.forward
    server.body.forward = lambda tokens: calls.append(len(tokens)) or forward(tokens)
    return calls


def one_by_one(model, splits: dict | None = None) -> tuple[dict, dict]:
    """Each client's rows and input gradient from an unbatched server, and the FLOPs it counted
    (`splits`: client -> where its head ends, when not the model's split)."""
    meter, answers = Meter(), {}
    server = BodyServer(model, meter, torch.device("cpu"))
    for client, samples in enumerate(SIZES):
        session = Session(server, client, (splits or {}).get(client))
        rows = session.request("forward", "tokens", tokens_of(model, client, samples))
        answers[client] = (rows, session.request("backward", "grad", grad_of(rows, client)))
    return answers, meter.take()


def concurrently(server: BodyServer, work, clients) -> dict:
    """Runs `work(client)` for every client on its own thread; returns what each returned or raised."""
    results = {}

    def run(client):
        try:
            results[client] = work(client)
        except Exception as err:  # noqa: BLE001 - collected and checked by the test
            results[client] = err

    threads = [threading.Thread(target=run, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_concurrent_clients_run_as_one_batch_and_get_their_own_answers_and_flops():
    _, model = tiny_split(client_blocks=1)
    expected, expected_costs = one_by_one(model)
    meter = Meter()
    server = BodyServer(model, meter, torch.device("cpu"), batch_window_s=30.0)  # everyone arrives well within
    calls = counting_body_calls(server)
    sessions = {client: Session(server, client) for client in range(len(SIZES))}

    def work(client):
        rows = sessions[client].request("forward", "tokens", tokens_of(model, client, SIZES[client]))
        return rows, sessions[client].request("backward", "grad", grad_of(rows, client))

    started = time.monotonic()
    answers = concurrently(server, work, sessions)
    assert time.monotonic() - started < 30  # the batch ran once every client with a session was in it
    assert calls == [sum(SIZES)]  # one forward for all four clients
    for client in sessions:
        for got, want in zip(answers[client], expected[client]):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert meter.take()["flops_by_phase"] == expected_costs["flops_by_phase"]
    assert server.pending == 0


def test_concurrent_probe_requests_run_as_one_batch_without_a_graph_and_get_their_own_rows():
    _, model = tiny_split(prompts=0)
    alone = BodyServer(model, Meter(), torch.device("cpu"))
    expected = {client: Session(alone, client).request("features", "tokens", tokens_of(model, client, samples))
                for client, samples in enumerate(SIZES)}
    meter = Meter()
    server = BodyServer(model, meter, torch.device("cpu"), batch_window_s=30.0)
    calls = counting_body_calls(server)
    sessions = {client: Session(server, client) for client in range(len(SIZES))}
    answers = concurrently(server, lambda c: sessions[c].request("features", "tokens", tokens_of(model, c, SIZES[c])),
                           sessions)
    assert calls == [sum(SIZES)] and server.passes == {"features": 1} and server.pending == 0
    for client in sessions:
        torch.testing.assert_close(answers[client], expected[client], atol=1e-5, rtol=1e-4)
    assert set(meter.take()["flops_by_phase"]) == {"server/probe"}


def test_clients_arriving_one_after_another_within_the_window_of_each_other_make_one_batch():
    """The window is a pause: a batch whose clients come 50 ms apart is not cut after 200 ms (a deadline
    from the first arrival cut it in two, and each phase then paid two passes through the body)."""
    _, model = tiny_split()
    clients = range(8)
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=0.2)
    sessions = {client: Session(server, client) for client in clients}

    def work(client):
        time.sleep(0.05 * client)
        tokens = tokens_of(model, client, 2)
        rows = sessions[client].request("forward", "tokens", tokens)
        return rows, sessions[client].request("backward", "grad", grad_of(rows, client))

    answers = concurrently(server, work, clients)
    assert not [answer for answer in answers.values() if isinstance(answer, Exception)]
    assert server.passes == {"forward": 1, "backward": 1}
    assert server.pending == 0


def test_a_client_that_closed_its_session_is_not_waited_for():
    """A client done with the body for the round says so (`done`); a batch then stops counting it among the
    clients that could still send. Before, a batch waited out its window for clients that had uploaded, so every
    late batch of a round paid the window."""
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0)
    early, late = Session(server, 0), Session(server, 1)  # the early one's work was in-process, say: it only closes
    early.seq += 1
    with pytest.raises(ProtocolError, match="carries no tensors"):
        server.handle(Message("done", {"x": torch.zeros(1)}, {"client": "0", "session": early.session, "seq": early.seq}))
    early.seq += 1
    assert server.handle(Message("done", {}, {"client": "0", "session": early.session, "seq": early.seq})).kind == "closed"
    started = time.monotonic()
    rows = late.request("forward", "tokens", tokens_of(model, 1, 3))  # alone now: runs at once, not after 30 s
    late.request("backward", "grad", grad_of(rows, 1))
    assert time.monotonic() - started < 10 and server.pending == 0
    with pytest.raises(ProtocolError, match="no session"):
        early.request("forward", "tokens", tokens_of(model, 0, 2))


def test_clients_with_heads_of_different_depths_are_batched_by_split_point_and_answered_as_alone():
    _, model = tiny_split(client_blocks=0)
    splits = {0: 0, 1: 2, 2: 2, 3: 0}
    expected, expected_costs = one_by_one(model, splits)
    meter = Meter()
    server = BodyServer(model, meter, torch.device("cpu"), batch_window_s=30.0)
    sessions = {client: Session(server, client, splits[client]) for client in range(len(SIZES))}

    def work(client):
        rows = sessions[client].request("forward", "tokens", tokens_of(model, client, SIZES[client]))
        return rows, sessions[client].request("backward", "grad", grad_of(rows, client))

    answers = concurrently(server, work, sessions)
    for client in sessions:
        rows, grad = answers[client]
        # the prompts' rows for a head without blocks, every row once the prompts pass through client blocks
        assert grad.shape[1] == (model.layout.prompts if splits[client] == 0 else model.layout.length)
        for got, want in zip(answers[client], expected[client]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert meter.take()["flops_by_phase"] == expected_costs["flops_by_phase"]
    # the body after 2 blocks is shorter: its clients cost the server less
    server_flops = [one_by_one(model, dict.fromkeys(range(len(SIZES)), blocks))[1]["flops_by_phase"]["server/split"]
                    for blocks in (0, 2)]
    assert server_flops[1] < server_flops[0]
    with pytest.raises(ConfigError, match="split after 6 blocks"):  # the tiny ViT has 6
        server.admit("deep", client_blocks=6)


def test_a_client_that_never_sends_its_backward_delays_no_one_and_is_freed_after_the_timeout():
    _, model = tiny_split()
    expected, _ = one_by_one(model)
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0, pending_timeout_s=2.0)
    sessions = {client: Session(server, client) for client in range(len(SIZES))}
    rows = concurrently(server, lambda c: sessions[c].request("forward", "tokens", tokens_of(model, c, SIZES[c])),
                        sessions)
    silent = 3  # crashed after its forward
    started = time.monotonic()
    # The others' backwards: the batch closes when every client with a session, less the silent one,
    # could have come; here the window is what ends the wait, so it is kept short for this phase.
    server.batch_window_s = 0.2
    grads = concurrently(server, lambda c: sessions[c].request("backward", "grad", grad_of(rows[c], c)),
                         [c for c in sessions if c != silent])
    assert time.monotonic() - started < 5
    for client, grad in grads.items():
        torch.testing.assert_close(grad, expected[client][1], atol=1e-5, rtol=1e-4)
    assert server.pending == 1  # only the silent client's forward is still held
    time.sleep(2.1)
    with pytest.raises(ProtocolError, match="without a pending forward"):  # expired: the graph is gone
        sessions[silent].request("backward", "grad", grad_of(rows[silent], silent))
    assert server.pending == 0


def test_a_malformed_request_is_refused_alone_and_a_late_client_gets_its_exact_answer():
    _, model = tiny_split()
    expected, _ = one_by_one(model)
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=0.5)
    sessions = {client: Session(server, client) for client in range(len(SIZES))}

    def work(client):
        tokens = tokens_of(model, client, SIZES[client])
        if client == 0:
            tokens[0, 0, 0] = float("nan")  # refused before any reply, alone
        rows = sessions[client].request("forward", "tokens", tokens)
        if client == 2:
            time.sleep(1.0)  # slow: its backward comes after the others' batch ran
        return rows, sessions[client].request("backward", "grad", grad_of(rows, client))

    answers = concurrently(server, work, sessions)
    assert isinstance(answers[0], ProtocolError) and "non-finite" in str(answers[0])
    for client in (1, 2, 3):
        for got, want in zip(answers[client], expected[client]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert server.pending == 0


def test_a_reply_its_wire_format_cannot_carry_fails_that_member_alone_and_leaves_nothing_stale():
    """float16 on the wire overflows above 65504: the member whose rows do gets its error; the batch's
    others are answered, and no forward is left waiting for a backward that cannot come."""
    from sfprompt.wire import WireFormat

    _, model = tiny_split(wire=WireFormat("float16"))
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0)
    sessions = {client: Session(server, client) for client in range(3)}
    body = server.body.forward  # rows beyond float16's range for inputs marked by a large value
    server.body.forward = lambda tokens: body(tokens) * torch.where(tokens.amax(dim=(1, 2), keepdim=True) > 1e4, 1e6, 1.0)

    def work(client):
        tokens = tokens_of(model, client, 2)
        tokens[:, 0, 0] = 2e4 if client == 1 else 0.0
        return sessions[client].request("forward", "tokens", tokens.half())

    answers = concurrently(server, work, sessions)
    assert isinstance(answers[1], ProtocolError) and "float16" in str(answers[1])
    assert all(torch.isfinite(answers[c].float()).all() for c in (0, 2))
    assert server.pending == 2 and "1" not in server._pending  # the others await their backward; client 1 nothing


def test_under_fp16_a_non_finite_gradient_is_refused_before_it_could_spoil_the_batchs_scale():
    vit, _ = tiny_split()
    model = SplitViT(vit, 3, 0, 0, precision="fp16")  # the scale is read from the batch's gradient
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0)
    sessions = {client: Session(server, client) for client in range(2)}

    def work(client):
        rows = sessions[client].request("forward", "tokens", tokens_of(model, client, 2))
        grad = grad_of(rows, client)
        if client == 0:
            grad[0, 0, 0] = float("nan")
        return sessions[client].request("backward", "grad", grad)

    answers = concurrently(server, work, sessions)
    assert isinstance(answers[0], ProtocolError) and "non-finite" in str(answers[0])
    assert torch.isfinite(answers[1]).all()


def test_a_forgotten_client_in_a_batch_gets_an_error_and_leaves_nothing_held():
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=0.0)
    session = Session(server, 0)
    forward = server._forward

    def forget_during(batch, checks):  # the runtime drops the client while its batch is in the body
        server.forget("0")
        forward(batch, checks)

    server._forward = forget_during
    with pytest.raises(ProtocolError, match="session ended"):
        session.request("forward", "tokens", tokens_of(model, 0, 2))
    assert server.pending == 0


def test_forward_batches_stop_at_batch_samples_and_each_graph_takes_one_backward_pass():
    """A forward batch is cut at `batch_samples` (on two CPU cores a body of 1,024 samples ran 0.62× as fast a
    sample as one of 128: docs/benchmarks/batching-cpu.md); a backward batch waits for every member of its graph, so a
    graph is never backpropagated twice for members that came apart."""
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0, batch_samples=4)
    calls = counting_body_calls(server)
    alone = BodyServer(model, Meter(), torch.device("cpu"))
    sessions = {client: Session(server, client) for client in range(6)}

    def work(client):
        rows = sessions[client].request("forward", "tokens", tokens_of(model, client, 2))
        return rows, sessions[client].request("backward", "grad", grad_of(rows, client))

    answers = concurrently(server, work, sessions)
    assert calls == [4, 4, 4]  # two clients a forward batch
    assert server.passes == {"forward": 3, "backward": 3} and server.pending == 0
    for client in sessions:
        expected = Session(alone, client)
        rows = expected.request("forward", "tokens", tokens_of(model, client, 2))
        for got, want in zip(answers[client], (rows, expected.request("backward", "grad", grad_of(rows, client)))):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="at least 1 sample"):
        BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=0.0, batch_samples=0)


def test_clients_in_lockstep_keep_one_batch_a_phase_exchange_after_exchange():
    """Exchange after exchange, each phase of clients in lockstep is one batch: a batch's clients count as free
    to send again before they hear back (counted busy until after, a client woken first could close the next
    batch on itself alone)."""
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0)
    sessions = {client: Session(server, client) for client in range(4)}

    def work(client):
        for _ in range(5):
            rows = sessions[client].request("forward", "tokens", tokens_of(model, client, 2))
            sessions[client].request("backward", "grad", grad_of(rows, client))

    assert not [error for error in concurrently(server, work, sessions).values() if error is not None]
    assert server.passes == {"forward": 5, "backward": 5}


def test_a_batch_never_holds_more_than_batch_samples_unless_one_request_does():
    """The cap is a bound: requests of 3 samples under a cap of 4 run one a batch (6 would pass it); a request larger
    than the cap runs alone. Probe features are cut like forwards."""
    _, model = tiny_split(prompts=0)
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0, batch_samples=4)
    calls = counting_body_calls(server)
    sessions = {client: Session(server, client) for client in range(4)}
    sizes = {0: 3, 1: 3, 2: 3, 3: 5}
    answers = concurrently(server, lambda c: sessions[c].request("features", "tokens", tokens_of(model, c, sizes[c])),
                           sessions)
    assert sorted(calls) == [3, 3, 3, 5] and server.passes == {"features": 4}
    assert {client: len(rows) for client, rows in answers.items()} == sizes


def test_a_waiting_backward_runs_before_a_waiting_forward_and_every_batch_on_one_thread():
    """Backwards go first (each frees its graph: a CPU body holding every client's graph at once ran slower
    a sample), and the body runs in one thread whoever led the batch (a CPU body run from each leading
    client's thread ran slower: each thread's OpenMP team and allocator arena)."""
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0, batch_samples=2)
    order, threads, run = [], set(), server._run
    server._run = lambda batch: order.append(batch[0].kind) or threads.add(threading.get_ident()) or run(batch)
    first, second = Session(server, 0), Session(server, 1)
    rows = first.request("forward", "tokens", tokens_of(model, 0, 2))
    release = threading.Event()
    server._body_thread.submit(release.wait)  # the body is busy while both requests gather
    answers = {}
    waiting = [threading.Thread(target=lambda: answers.setdefault("forward", second.request(
        "forward", "tokens", tokens_of(model, 1, 2))))]
    waiting[0].start()
    deadline = time.monotonic() + 30
    while len(server._batches) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting.append(threading.Thread(target=lambda: answers.setdefault("backward", first.request(
        "backward", "grad", grad_of(rows, 0)))))
    waiting[1].start()
    while len(server._batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in waiting:
        thread.join(30)
    assert not any(thread.is_alive() for thread in waiting)
    assert order == ["forward", "backward", "forward"] and set(answers) == {"forward", "backward"}
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_backward_does_not_wait_for_a_forgotten_member_of_its_graph():
    """A graph's backward batch waits for every member that owes a backward; a member dropped since (forgotten,
    closed or expired) owes none, so its partner's backward runs at once, not after the window."""
    _, model = tiny_split()
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0, batch_samples=4)
    sessions = {client: Session(server, client) for client in range(4)}
    rows = concurrently(server, lambda c: sessions[c].request("forward", "tokens", tokens_of(model, c, 2)), sessions)
    graphs = {client: server._pending[str(client)].graph for client in sessions}
    partner = next(c for c in sessions if c != 0 and graphs[c] is graphs[0])
    server.forget("0")
    started = time.monotonic()
    sessions[partner].request("backward", "grad", grad_of(rows[partner], partner))
    assert time.monotonic() - started < 10  # the other graph's members still owe theirs: only the count ends it
    assert server.pending == 2


def test_a_trained_body_cannot_batch():
    _, model = tiny_split()
    with pytest.raises(ValueError, match="trained body"):
        BodyServer(model, Meter(), torch.device("cpu"), body_optimizer=lambda body: None, batch_window_s=0.0)


def test_the_channel_batches_its_concurrent_clients():
    _, model = tiny_split()
    expected, _ = one_by_one(model)
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0)
    calls = counting_body_calls(server)
    sessions = {client: server.admit(str(client)) for client in range(len(SIZES))}
    with BodyChannelServer(server, "127.0.0.1:0", "token", workers=len(SIZES)) as channel:
        def work(client):
            with ChannelLink(channel.address, "token", Meter(), torch.device("cpu")) as link:
                session = SessionLink(link, client, sessions[client])
                rows = session.request(Message("forward", {"tokens": tokens_of(model, client, SIZES[client])}),
                                       "split").tensors["rows"]
                grad = session.request(Message("backward", {"grad": grad_of(rows, client)}), "split").tensors["grad"]
                return rows, grad

        answers = concurrently(server, work, sessions)
    assert calls == [sum(SIZES)]
    for client in sessions:
        for got, want in zip(answers[client], expected[client]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_throughput_benchmark_measures_every_mode(tmp_path):
    markdown = tmp_path / "batching.md"
    done = run_python_benchmark("body_batching.py", "--model", "test_vit", "--image-size", "32", "--clients", "1", "3",
                                "--steps", "1", "--precision", "fp32", "bf16", "--batch-samples", "2", "--repeats", "2",
                                "--batch-sizes", "2", "4", "--markdown", str(markdown))
    assert done.returncode == 0, done.stderr[-3000:]
    text = markdown.read_text()
    assert "--batch-samples 2 --repeats 2 --batch-sizes 2 4" in text and "forward batches of at most 2 samples" in text
    tables = text.split("by batch size")
    rows = [line.split(" | ") for line in tables[0].splitlines() if line.startswith(("| fp32", "| bf16"))]
    assert [(row[0], row[1]) for row in rows] == [("| fp32", "1"), ("| fp32", "3"), ("| bf16", "1"), ("| bf16", "3")]
    assert all(float(cell.replace(",", "")) > 0 for row in rows for cell in row[2:5])  # every mode ran
    assert [row[-1] for row in rows] == ["2.0 |", "6.0 |"] * 2  # batches of 32 samples stop at 2: a client each
    sizes = [line.split(" | ") for line in tables[1].splitlines() if line.startswith(("| fp32", "| bf16"))]
    assert len(sizes) == 2 and all(float(cell.strip(" |").replace(",", "")) > 0 for row in sizes for cell in row[1:])


def test_close_refuses_a_gathering_batch_and_later_requests_and_ends_the_body_thread():
    _, model = tiny_split(client_blocks=1)
    others = set(threading.enumerate())  # other tests' servers' threads among them
    server = BodyServer(model, Meter(), torch.device("cpu"), batch_window_s=30.0)
    Session(server, 2).request("features", "tokens", tokens_of(model, 2, 1))  # alone: the body thread runs it at once
    body_threads = [thread for thread in set(threading.enumerate()) - others if thread.name.startswith("body")]
    assert body_threads
    waiting, late = Session(server, 0), Session(server, 1)  # client 1 could still send: client 0's batch gathers
    results = {}
    thread = threading.Thread(target=lambda: results.update(concurrently(
        server, lambda client: waiting.request("forward", "tokens", tokens_of(model, 0, 2)), [0])))
    thread.start()
    while True:  # client 0 leads its batch and waits for client 1
        with server._lock:
            if server._queued["forward"]:
                break
        time.sleep(0.01)
    started = time.monotonic()
    server.close()
    thread.join(10)
    assert time.monotonic() - started < 10  # not the 30 s window
    assert isinstance(results[0], ProtocolError) and str(results[0]) == "the body server closed"  # while gathering
    with pytest.raises(ProtocolError, match="closed"):
        late.request("forward", "tokens", tokens_of(model, 1, 2))
    assert not any(thread.is_alive() for thread in body_threads)
