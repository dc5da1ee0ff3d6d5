"""The Flower ServerApp and ClientApp code paths without Ray: a grid that hands each message, through Flower's
protobuf encoding, to the ClientApp's handler in this process (SecAgg+'s messages to the ClientApp with its mods;
one Context per node, kept across rounds; a new grid is a new `flwr run`, with fresh Contexts, on the same node
disks), with the body channel on loopback. Fast enough to inject every kind of client failure."""

import json
from collections import Counter

import numpy as np

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from sfprompt.client import Client, ClientFailure
from sfprompt.config import Config, ConfigError
from sfprompt.federation import prepare
from sfprompt.seeds import private_seed
from sfprompt.flower import client_app
from sfprompt.flower.records import from_arrays
from sfprompt.flower.server_app import FlowerRuntime, find_partitions
from sfprompt.flower.settings import FlowerOptions, from_run_config
from sfprompt.probe import STATISTICS
from sfprompt.runner import RoundFailed, run
from sfprompt.splits import head_gflop

from test_runner import tiny_config
from test_splits import budgets_for


class InlineGrid:
    """A Flower grid whose SuperNodes are handler calls; `lost` nodes never reply."""

    def __init__(self, partitions: int, lost: tuple[int, ...] = (), seed: int = 0) -> None:
        # each node's private seed as the in-process runtime derives it, so that the two can be compared
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": partitions,
                                                       "private-seed": private_seed(seed, k)})
                         for k in range(partitions)}
        self.lost = {100 + k for k in lost}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        for message in messages:
            message = over_the_wire(message)
            node = message.metadata.dst_node_id
            if node in self.lost and message.metadata.message_type == MessageType.TRAIN:
                continue  # as if the deadline passed
            handler = client_app.describe if message.metadata.message_type == MessageType.QUERY else client_app.train
            if RECORD_KEY_CONFIGS in message.content.config_records:  # SecAgg+: through the ClientApp and its mods
                handler = client_app.app
            try:
                reply = handler(message, self.contexts[node])
            except Exception as err:  # what Flower does when a ClientApp raises
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            yield over_the_wire(reply)


def over_the_wire(message):
    """The message as its receiver gets it: through Flower's protobuf encoding (each node its own copy)."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(message))


@pytest.fixture(autouse=True)
def node_disks(tmp_path, monkeypatch):
    """Each SuperNode's default state dir, inside the test's folder (one disk per partition)."""
    monkeypatch.setattr(client_app, "STATE_DIR", tmp_path / "supernodes")
    return tmp_path / "supernodes"


@pytest.fixture(autouse=True)
def flower_task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; outside Flower we set one."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def run_inline(config, grid, options=FlowerOptions(), log=lambda _: None):
    nodes, folder_sizes, budgets = find_partitions(grid, wait_s=5)
    return run(config, progress=False, log=log,
               runtime=lambda fed: FlowerRuntime(fed, grid, nodes, options, folder_sizes, budgets))


def dropped_from_a_failed_round(config, grid, options, failed):
    """Run `config` inline, expecting its round to fail (`failed`: the RoundFailed message's pattern); the log's
    lines about dropped clients."""
    lines = []
    with pytest.raises(RoundFailed, match=failed):
        run_inline(config, grid, options, log=lines.append)
    return [line for line in lines if "dropped client" in line]


def fail_in_split(monkeypatch, fails):
    """Every client whose id `fails` accepts raises in its split phase."""
    loader = Client._loader

    def failing(self, data, ctx, shuffle=True):
        if fails(self.cid) and ctx.phase == "split":
            raise RuntimeError("battery died")
        return loader(self, data, ctx, shuffle)

    monkeypatch.setattr(Client, "_loader", failing)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, changes", [("sfprompt", {}), ("sl", {}), ("fl", {}), ("linear-probe", {}),
                                             ("sfprompt", {"probe_rounds": 1}),
                                             ("sfprompt", {"probe_rounds": 1, "probe_clients": 3}),
                                             ("sfprompt", {"probe_rounds": 1, "refit_rounds": 1, "rounds": 3}),
                                             ("sfprompt", {"prompt_updates": "forward-only", "directions": 2}),
                                             ("sfprompt", {"aggregator": "fedadam", "server_lr": 0.01}),
                                             ("sfprompt", {"client_holdout": 0.25}),
                                             ("sfprompt", {"aggregator": "fedprox", "proximal_mu": 1.0})])
def test_the_flower_apps_give_the_in_process_result(imagefolder, tmp_path, method, changes):
    config = tiny_config(imagefolder, tmp_path, **{"clients": 3, "clients_per_round": 2, "rounds": 2, "method": method,
                                                   **changes})
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    run_inline(config.replace(out=str(tmp_path / "flower")), InlineGrid(3))
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local)
    assert [r["accuracy"] for r in records(tmp_path / "local")] == [r["accuracy"] for r in records(tmp_path / "flower")]
    assert [r["clients"] for r in records(tmp_path / "local")] == [r["clients"] for r in records(tmp_path / "flower")]


def test_a_client_failing_in_its_phase_is_dropped_with_its_phase(imagefolder, tmp_path, monkeypatch):
    fail_in_split(monkeypatch, lambda cid: cid == 1)
    run_inline(tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1), InlineGrid(3))
    assert records(tmp_path / "run")[0]["dropped"] == [{"client": 1, "phase": "split", "reason": "RuntimeError: battery died"}]


def test_a_crashed_client_app_and_a_silent_node_are_dropped(imagefolder, tmp_path, monkeypatch):
    train = client_app.train

    def crashing(msg, context):
        if context.node_config["partition-id"] == 0:
            raise MemoryError("out of memory while loading the model")
        return train(msg, context)

    monkeypatch.setattr(client_app, "train", crashing)
    run_inline(tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1, client_timeout_s=30.0),
               InlineGrid(3, lost=(2,)))
    dropped = records(tmp_path / "run")[0]["dropped"]
    assert dropped[0]["client"] == 0 and "out of memory" in dropped[0]["reason"]
    assert dropped[1] == {"client": 2, "phase": "unknown", "reason": "no reply within 30.0 s"}


def test_a_node_may_keep_the_dataset_at_its_own_path(imagefolder, tmp_path):
    import shutil

    config = tiny_config(imagefolder, tmp_path, clients=2, clients_per_round=2, rounds=1)
    run_inline(config.replace(out=str(tmp_path / "reference")), InlineGrid(2))
    grid = InlineGrid(2)
    grid.contexts[101].node_config["data-dir"] = str(shutil.copytree(imagefolder, tmp_path / "node-1-disk"))
    run_inline(config.replace(out=str(tmp_path / "copy")), grid)
    assert records(tmp_path / "copy")[0]["accuracy"] == records(tmp_path / "reference")[0]["accuracy"]
    grid.contexts[101].node_config["data-dir"] = str(tmp_path / "nothing-here")
    run_inline(config.replace(out=str(tmp_path / "missing")), grid)
    (dropped,) = records(tmp_path / "missing")[0]["dropped"]
    assert dropped["client"] == 1 and "nothing-here" in dropped["reason"]


def test_every_partition_needs_exactly_one_node():
    grid = InlineGrid(3)
    grid.contexts[101].node_config["partition-id"] = 0
    with pytest.raises(ConfigError, match="two SuperNodes hold partition 0"):
        find_partitions(grid, wait_s=1)


def test_a_resumed_flower_run_ends_equal_to_an_uninterrupted_one(imagefolder, tmp_path, monkeypatch):
    """The ServerApp dies in round 3 after its clients trained (and kept their private classifiers);
    the resumed run is a new `flwr run` with fresh Contexts, whose nodes find their classifiers on
    disk as they stood after round 2, the last checkpointed."""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=2, rounds=4)
    run_inline(config.replace(out=str(tmp_path / "straight")), InlineGrid(3))
    end_round, rounds = FlowerRuntime.end_round, []

    def dying_in_round_3(self):
        rounds.append(1)
        if len(rounds) == 3:
            raise KeyboardInterrupt("the ServerApp is killed")
        end_round(self)

    monkeypatch.setattr(FlowerRuntime, "end_round", dying_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_inline(config.replace(out=str(tmp_path / "resumed")), InlineGrid(3))
    monkeypatch.setattr(FlowerRuntime, "end_round", end_round)
    nodes = InlineGrid(3)  # a new `flwr run`: fresh Contexts on the same node disks
    find, _, _ = find_partitions(nodes, wait_s=5)
    run(config.replace(out=str(tmp_path / "resumed")), progress=False, log=lambda _: None, resume=True,
        runtime=lambda fed: FlowerRuntime(fed, nodes, find, FlowerOptions(resume=True)))
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert [r["accuracy"] for r in straight] == [r["accuracy"] for r in resumed]
    a, b = load_file(tmp_path / "straight" / "global.safetensors"), load_file(tmp_path / "resumed" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_server_waits_for_a_late_supernode():
    grid = InlineGrid(3)
    late = grid.contexts.pop(102)
    calls = []
    get_node_ids = grid.get_node_ids

    def arriving():
        calls.append(1)
        if len(calls) == 3:  # the third SuperNode registers after two polls
            grid.contexts[102] = late
        return get_node_ids()

    grid.get_node_ids = arriving
    assert find_partitions(grid, wait_s=10) == ({0: 100, 1: 101, 2: 102}, {}, {})


def node(partition: int, **node_config) -> Context:
    """A fresh Context, as each `flwr run` gives a SuperNode."""
    return Context(run_id=1, node_id=partition, state=RecordDict(), run_config={},
                   node_config={"partition-id": partition, "num-partitions": 3, **node_config})


def test_a_node_draws_its_own_private_seed_once_unless_its_node_config_names_one(tmp_path):
    seeds = [client_app.NodeState(node(k)).private_seed() for k in range(2)]
    assert seeds[0] != seeds[1]  # from the operating system's entropy, not from anything the server sent
    assert all(2**127 <= seed < 2**128 for seed in seeds)  # 127 bits, all kept by the private streams
    assert [client_app.NodeState(node(k)).private_seed() for k in range(2)] == seeds  # kept on the node's disk
    assert client_app.NodeState(node(0, **{"state-dir": str(tmp_path / "elsewhere")})).private_seed() != seeds[0]
    assert oct((tmp_path / "supernodes" / "partition-0" / "private-seed").stat().st_mode)[-3:] == "600"
    assert client_app.NodeState(node(2, **{"private-seed": 42})).private_seed() == 42


def test_a_secret_a_node_drew_before_127_bit_secrets_is_kept_with_a_warning(tmp_path, caplog):
    """A 63-bit secret on a node's disk keeps the streams it seeded (a new one would draw the node's randomized
    labels a second time), and the node is told what that leaves it."""
    import logging

    from sfprompt.seeds import private_generator

    old = 2**62 + 12345
    folder = tmp_path / "supernodes" / "partition-0"
    folder.mkdir(parents=True)
    (folder / "private-seed").write_text(str(old))
    with caplog.at_level(logging.WARNING):
        assert client_app.NodeState(node(0)).private_seed() == old
    assert "before sfprompt drew 127-bit secrets" in caplog.text
    assert torch.equal(torch.rand(50, generator=private_generator(old)), torch.rand(50, generator=torch.Generator().manual_seed(old)))


def test_two_runs_with_one_seed_never_add_the_same_noise_to_the_same_send(imagefolder, tmp_path, monkeypatch):
    """A learning-rate sweep with one --seed on nodes that drew their own secrets: the noise on each send is
    fresh per run (the same draw again would let the server cancel it by differencing), while a node's
    randomized labels, its noise in a resumed run, and a node whose config names `private-seed` repeat."""
    sent = {}
    request = client_app.ChannelLink.request

    def tap(self, message, phase, memory=None):
        if message.kind == "forward":
            sent.setdefault(run_name, []).append(message.tensors["tokens"].clone())
        return request(self, message, phase, memory)

    monkeypatch.setattr(client_app.ChannelLink, "request", tap)
    config = tiny_config(imagefolder, tmp_path, clients=2, clients_per_round=2, rounds=1, clip_norm=5.0,
                         noise_multiplier=1.0)

    class OwnSecrets(InlineGrid):  # nodes that draw their own secrets, as deployed ones do
        def __init__(self):
            super().__init__(2)
            for context in self.contexts.values():
                del context.node_config["private-seed"]

    for run_name in ("first", "second"):
        run_inline(config.replace(out=str(tmp_path / run_name)), OwnSecrets())
    difference = sent["first"][0] - sent["second"][0]
    assert difference[:, config.prompt_tokens + 1:].abs().max() > 0.5  # noise of std 5 on the patch rows
    seeds = [client_app.NodeState(node(0)).noise_seed(key) for key in ("a" * 32, "b" * 32, "a" * 32)]
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]
    assert client_app.NodeState(node(0)).private_seed() == client_app.NodeState(node(0)).private_seed()
    assert client_app.NodeState(node(0, **{"private-seed": 7})).noise_seed("a" * 32) == 7


def test_a_node_refuses_a_run_key_that_is_not_a_name():
    with pytest.raises(ValueError, match="not 32 hex digits"):
        client_app.NodeState(node(0)).client_state("../../etc", 2)


def _inflated(reply):
    record = reply.content["sfprompt"]
    record["meta"] = json.dumps({**json.loads(record["meta"]), "num_examples": 10**6})  # the FedAvg weight: a claim


def _unreadable(reply, array, pickled=False):  # an array NumPy reads only with pickle (never run), or torch cannot hold
    import io

    from flwr.app import Array, ArrayRecord

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=pickled)
    reply.content["upload"] = ArrayRecord({"prompts": Array(dtype=str(array.dtype), shape=tuple(array.shape),
                                                              stype="numpy.ndarray", data=buffer.getvalue())})


def _npy(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _raw(reply, data):  # an array whose bytes are `data`, whatever they hold
    from flwr.app import Array, ArrayRecord

    reply.content["upload"] = ArrayRecord({"prompts": Array(dtype="float32", shape=(64,), stype="numpy.ndarray",
                                                              data=data)})


def _in_config(reply, key, value):
    reply.content["sfprompt"][key] = value


MALFORMED_REPLIES = {
    "no meter": (lambda reply: reply.content["sfprompt"].pop("meter"), "reply", "KeyError"),
    "no upload": (lambda reply: reply.content.array_records.pop("upload"), "reply", "KeyError"),
    "no meta": (lambda reply: reply.content["sfprompt"].pop("meta"), "reply", "KeyError"),
    "meta not an object": (lambda reply: _in_config(reply, "meta", "[1]"), "reply", "not an object"),
    "meter not JSON": (lambda reply: _in_config(reply, "meter", "{not json"), "reply", "JSONDecodeError"),
    "meter not counts": (lambda reply: _in_config(reply, "meter", '{"bytes": 3}'), "reply", "not a meter"),
    "negative count": (lambda reply: _in_config(reply, "meter", json.dumps(
        {"bytes": {"up/split": -1}, "messages": {}, "flops": {}, "client_peak_memory": 0})), "reply", "not a count"),
    "failure not JSON": (lambda reply: _in_config(reply, "failure", "]"), "reply", "JSONDecodeError"),
    "upload needs pickle": (lambda reply: _unreadable(reply, np.array([{"a": 1}]), pickled=True), "upload",
                            "unreadable upload: ValueError"),
    "upload of strings": (lambda reply: _unreadable(reply, np.array(["a"])), "upload", "unreadable upload: TypeError"),
    "upload empty": (lambda reply: _raw(reply, b""), "upload", "not a NumPy .npy buffer"),
    "upload a zip": (lambda reply: _raw(reply, b"PK\x03\x04" + b"\x00" * 40), "upload", "not a NumPy .npy buffer"),
    "upload truncated": (lambda reply: _raw(reply, _npy(np.zeros(64, np.float32))[:90]), "upload", "unreadable upload"),
    "inflated sample count": (_inflated, "upload", "more than its cap"),
}


@pytest.mark.parametrize("corruption", MALFORMED_REPLIES)
def test_a_malformed_reply_drops_its_client_not_the_server_app(imagefolder, tmp_path, monkeypatch, corruption):
    corrupt, phase, reason = MALFORMED_REPLIES[corruption]
    train = client_app.train

    def malformed(msg, context):
        reply = train(msg, context)
        if context.node_config["partition-id"] == 1:
            corrupt(reply)
        return reply

    monkeypatch.setattr(client_app, "train", malformed)
    run_inline(tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1), InlineGrid(3))
    (dropped,) = records(tmp_path / "run")[0]["dropped"]
    assert dropped["client"] == 1 and dropped["phase"] == phase and reason in dropped["reason"]
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "global.safetensors").values())


def test_the_uncounted_control_fields_are_as_small_as_the_readme_says(imagefolder, tmp_path):
    """Bytes are counted for the codec's payloads; under Flower the control fields beside them (task:
    config, class names, partition, seeds, session, token, ...; reply: the measurements) are not. docs/flower.md: about
    1.7 KB down and 0.3 KB up per client and round, plus the root certificate with TLS."""
    grid = InlineGrid(3)
    fed = prepare(tiny_config(imagefolder, tmp_path, clients=3))
    runtime = FlowerRuntime(fed, grid, *find_partitions(grid, wait_s=5)[:1], FlowerOptions())
    try:
        task = runtime.task(0, 1)
        down = sum(len(key) + len(str(value).encode()) for key, value in task.items())
        assert 1024 < down < 1900
        for direction, phase in (("up", "split"), ("down", "split"), ("up", "upload"), ("down", "broadcast")):
            fed.meter.count_message(direction, phase, b"x" * 10**7)
        for phase in ("local", "prune", "split"):
            fed.meter.flops["client", phase] += 10**15
        up = len(json.dumps(fed.meter.counts()).encode()) + len("meter")  # a round's measurements, as sent
        assert up < 512
    finally:
        runtime.close()


def test_body_batching_reaches_the_body_server_and_keeps_the_result(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=2, rounds=1)
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    runtimes = []
    nodes, folder_sizes, _ = find_partitions(InlineGrid(3), wait_s=5)
    options = FlowerOptions(body_batching=True, body_batch_window_s=0.01, body_batch_samples=64)
    run(config.replace(out=str(tmp_path / "flower")), progress=False, log=lambda _: None,
        runtime=lambda fed: runtimes.append(FlowerRuntime(fed, InlineGrid(3), nodes, options, folder_sizes)) or runtimes[-1])
    assert runtimes[0].body.batch_window_s == 0.01 and runtimes[0].body.batch_samples == 64
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local)


class ConcurrentGrid(InlineGrid):
    """An inline grid whose SuperNodes work at once, each on its own thread, as deployed ones do."""

    def send_and_receive(self, messages, *, timeout=None):
        from concurrent.futures import ThreadPoolExecutor

        messages = list(messages)
        with ThreadPoolExecutor(max_workers=max(len(messages), 1)) as pool:
            return list(pool.map(lambda message: next(InlineGrid.send_and_receive(self, [message])), messages))


def batched_concurrently(config, tmp_path) -> tuple[int, Counter]:
    """`config` run in-process and under Flower with three concurrent nodes and body batching (a 1 s window); checks
    both end alike, to float tolerance. The Flower run's split requests and its body server's passes."""
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    runtimes, grid = [], ConcurrentGrid(3)
    nodes, folder_sizes, _ = find_partitions(grid, wait_s=5)
    options = FlowerOptions(body_batching=True, body_batch_window_s=1.0)
    run(config.replace(out=str(tmp_path / "flower")), progress=False, log=lambda _: None,
        runtime=lambda fed: runtimes.append(FlowerRuntime(fed, grid, nodes, options, folder_sizes)) or runtimes[-1])
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local)
    return records(tmp_path / "flower")[0]["messages_by_phase"]["up/split"], runtimes[0].body.passes


def test_body_batching_batches_concurrent_clients_and_keeps_the_result(imagefolder, tmp_path):
    """Clients that work at once share the body's passes (a batch holds several of them), and the run ends as the
    in-process one does, to float tolerance. (Nodes built at once in one process once drew each other's random
    weights from the global generator: their builds are now one at a time.)"""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1, method="sfl")
    requests, passes = batched_concurrently(config, tmp_path)
    requests //= 2  # forwards, as many backwards
    assert passes["forward"] < requests and passes["backward"] < requests  # batches of several clients


@pytest.mark.parametrize("changes", [{"directions": 2}, {"estimator": "residual", "client_blocks": 1}])
def test_body_batching_batches_forward_only_evaluates_and_runs_no_backward(imagefolder, tmp_path, changes):
    """Forward-only's evaluates (a batch and its prompt sets; with client blocks, residual's one set made on the
    client) from clients that work at once share the body's passes, no backward ever runs, and the run ends as the
    in-process one does."""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1, method="sfl",
                         prompt_updates="forward-only", **changes)
    requests, passes = batched_concurrently(config, tmp_path)  # evaluates, nothing else
    assert 0 < passes["evaluate"] < requests and passes["backward"] == passes["forward"] == 0


def test_body_batching_is_refused_with_a_trained_body():
    with pytest.raises(ConfigError, match="trained body"):
        from_run_config({"method": "sfl", "train-body": True, "body-batching": True})
    with pytest.raises(ConfigError, match="body-batch-samples is 0"):
        from_run_config({"body-batching": True, "body-batch-samples": -1})
    assert from_run_config({})[1].body_batch_samples == 0  # the device's default, server.BATCH_SAMPLES


def assert_flower_gives_the_in_process_result(config, tmp_path):
    """`config` run in process and under the inline Flower grid: the same model, and every round's accuracy,
    bytes and FLOPs by phase."""
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    run_inline(config.replace(out=str(tmp_path / "flower")), InlineGrid(config.clients, seed=config.seed))
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local)
    for a, b in zip(records(tmp_path / "local"), records(tmp_path / "flower")):
        assert (a["accuracy"], a["bytes_by_phase"], a["flops_by_phase"]) == (b["accuracy"], b["bytes_by_phase"], b["flops_by_phase"])


@pytest.mark.parametrize("changes", [{}, {"prompt_updates": "forward-only", "estimator": "residual"}])
def test_mixed_split_points_under_flower_give_the_in_process_result(imagefolder, tmp_path, changes):
    """A simulated federation's drawn budgets (--client-budgets) reach the ClientApps as each one's split point (with
    residual forward-only steps, a head with no blocks has the server perturb its prompts, one with blocks perturbs
    them itself)."""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=2, seed=2, **changes)
    config = config.replace(client_budgets=budgets_for(prepare(config).model, 0, 2))
    assert len({c.model.client_blocks for c in prepare(config).clients}) == 2
    assert_flower_gives_the_in_process_result(config, tmp_path)


def test_a_compact_wire_format_under_flower_gives_the_in_process_result(imagefolder, tmp_path):
    """--wire-dtype and --shared-rows reach the ClientApps and the body channel: the same model, bytes and FLOPs."""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=2, rounds=2, wire_dtype="int8",
                         shared_rows="once")
    assert_flower_gives_the_in_process_result(config, tmp_path)


def test_a_node_budget_chooses_its_split_point(imagefolder, tmp_path):
    """Each SuperNode's `budget-gflop` decides where its head ends (the deepest it affords); SplitFed then
    trains the model a federation without client blocks trains, with more bytes down (every row's gradient)."""
    config = tiny_config(imagefolder, tmp_path, method="sfl", clients=3, clients_per_round=3, rounds=1)
    costs = head_gflop(prepare(config).model)
    grid = InlineGrid(3)
    grid.contexts[101].node_config["budget-gflop"] = costs[3] * 1.01
    grid.contexts[102].node_config["budget-gflop"] = 1e6  # all but the last block
    nodes, folder_sizes, budgets = find_partitions(grid, wait_s=5)
    assert budgets == {1: costs[3] * 1.01, 2: 1e6}
    runtimes = []
    run(config.replace(out=str(tmp_path / "flower")), progress=False, log=lambda _: None,
        runtime=lambda fed: runtimes.append(FlowerRuntime(fed, grid, nodes, FlowerOptions(), folder_sizes, budgets))
        or runtimes[-1])
    assert runtimes[0].splits == {0: 0, 1: 3, 2: len(costs) - 1}
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-4, rtol=1e-3) for k in local)
    (uniform,), (mixed,) = records(tmp_path / "local"), records(tmp_path / "flower")
    assert mixed["bytes_down"] > uniform["bytes_down"] and mixed["client_flops"] > uniform["client_flops"]


@pytest.mark.parametrize("budget, message", [("lots", "budget-gflop must be a positive number"),
                                             (1e-9, "does not cover the head's embedding")])
def test_a_node_budget_that_is_not_a_number_or_too_small_stops_the_run_saying_why(imagefolder, tmp_path, budget,
                                                                                  message):
    grid = InlineGrid(3)
    grid.contexts[100].node_config["budget-gflop"] = budget
    with pytest.raises(ConfigError, match=message):
        run_inline(tiny_config(imagefolder, tmp_path, clients=3, rounds=1), grid)


def secure_aggregation_bound(clipping_range, sizes, largest_value, max_weight=None):
    """How far SecAgg+'s average of uploads from clients of `sizes` samples may lie from the plain one: Flower scales
    each upload by its weight (its size over the largest), quantises it into 2**22 levels of +-clipping range
    (stochastic rounding: an error under one level a client) and divides the sum by the summed weights, themselves
    quantised (to half a level; `max_weight`: the largest size in the round, if not
    in `sizes`); both averages are then rounded to float32 (half an ulp each)."""
    levels, weights = 2**22, [size / (max_weight or max(sizes)) for size in sizes]
    quantised = len(sizes) * (2 * clipping_range / levels) / sum(weights)
    weighted = largest_value * len(sizes) / (levels * sum(weights))
    return quantised + weighted + 2 * largest_value * 2.0**-24


class TappedGrid(InlineGrid):
    """An inline grid that keeps every reply the server receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):
        for reply in super().send_and_receive(messages, timeout=timeout):
            self.replies.append(reply)
            yield reply


@pytest.mark.parametrize("method", ["sfprompt", "linear-probe"])
def test_secure_aggregation_gives_the_plain_average_within_its_quantisation_and_hides_each_upload(imagefolder, tmp_path,
                                                                                                   method):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    config = tiny_config(imagefolder, tmp_path, clients=4, clients_per_round=3, rounds=1, method=method)
    plain, secure = TappedGrid(4), TappedGrid(4)
    run_inline(config.replace(out=str(tmp_path / "plain")), plain)
    run_inline(config.replace(out=str(tmp_path / "secure")), secure, FlowerOptions(secure_aggregation=True))

    (before,), (after,) = records(tmp_path / "plain"), records(tmp_path / "secure")
    assert after["clients"] == before["clients"] and not after["dropped"]
    averaged, securely = load_file(tmp_path / "plain" / "global.safetensors"), load_file(tmp_path / "secure" / "global.safetensors")
    # the probe's average is of its statistics (the classifier is fitted on them, amplifying the gap)
    compared = [key for key in averaged if method != "linear-probe" or key in STATISTICS]
    gaps = {key: float((averaged[key] - securely[key]).abs().max()) for key in compared}
    sizes = [client.num_examples for client in prepare(config).clients if client.cid in after["clients"]]
    bound = secure_aggregation_bound(FlowerOptions().secagg_clipping_range, sizes,
                                     max(float(averaged[key].abs().max()) for key in compared))
    assert 0 < max(gaps.values()) <= bound, (gaps, bound)  # quantised, yet within the bound
    assert after["bytes_by_phase"]["up/secagg"] > 0 and after["bytes_by_phase"]["down/secagg"] > 0

    # what the server received of each client's upload: the masked vector, which says nothing about the upload
    uploads = {reply.metadata.src_node_id: from_arrays(reply.content["upload"])
               for reply in plain.replies if reply.metadata.message_type == MessageType.TRAIN}
    masked = {reply.metadata.src_node_id: reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
              for reply in secure.replies if Key.MASKED_PARAMETERS in reply.content.config_records.get(RECORD_KEY_CONFIGS, {})}
    assert masked.keys() == uploads.keys() and len(masked) == 3
    assert not any(len(record) for reply in secure.replies if not reply.has_error()
                   for record in reply.content.array_records.values())  # Flower's mod empties the plain upload
    for node, vectors in masked.items():
        arrays = [bytes_to_ndarray(b) for b in vectors][1:]  # the first holds the masked weight
        seen = torch.from_numpy(np.concatenate([a.ravel() for a in dequantize(arrays, FlowerOptions().secagg_clipping_range,
                                                                              2**22)]))
        upload = uploads[node]
        truth = torch.cat([upload[name].double().ravel() for name in sorted(upload)])
        assert seen.shape == truth.shape
        # uniform noise, not the upload: five standard deviations of the correlation of independent values
        assert abs(float(torch.corrcoef(torch.stack([seen, truth]))[0, 1])) < 5 / len(truth) ** 0.5


class VanishingGrid(InlineGrid):
    """An inline grid whose `vanishing` nodes answer SecAgg+'s first two stages (their keys are shared), then
    never again: the server must recover their masks from the others' shares."""

    def __init__(self, *args, vanishing=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.vanishing = {100 + k for k in vanishing}

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

        def stays(message):
            record = message.content.config_records.get(RECORD_KEY_CONFIGS, {})
            return not (message.metadata.dst_node_id in self.vanishing and record.get(Key.STAGE) in (
                Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK))

        yield from super().send_and_receive([m for m in messages if stays(m)], timeout=timeout)


def test_under_secure_aggregation_a_failed_and_a_vanished_client_are_dropped_and_the_others_averaged(
        imagefolder, tmp_path, monkeypatch):
    fail_in_split(monkeypatch, lambda cid: cid == 1)
    config = tiny_config(imagefolder, tmp_path, clients=4, clients_per_round=4, rounds=1, client_timeout_s=30.0)
    run_inline(config.replace(out=str(tmp_path / "plain")), InlineGrid(4, lost=(3,)))
    run_inline(config.replace(out=str(tmp_path / "secure")), VanishingGrid(4, vanishing=(3,)),
               FlowerOptions(secure_aggregation=True))
    (plain,), (secure,) = records(tmp_path / "plain"), records(tmp_path / "secure")
    assert secure["dropped"] == [{"client": 1, "phase": "split", "reason": "RuntimeError: battery died"},
                                 {"client": 3, "phase": "unknown",
                                  "reason": "no upload in the secure aggregation's masking stage"}]
    assert [d["client"] for d in plain["dropped"]] == [1, 3] and secure["kept_samples"] == plain["kept_samples"]
    sizes = [client.num_examples for client in prepare(config).clients]
    averaged, securely = load_file(tmp_path / "plain" / "global.safetensors"), load_file(tmp_path / "secure" / "global.safetensors")
    bound = secure_aggregation_bound(FlowerOptions().secagg_clipping_range, [sizes[0], sizes[2]],
                                     max(float(value.abs().max()) for value in averaged.values()), max_weight=max(sizes))
    assert all(torch.allclose(averaged[k], securely[k], rtol=0, atol=bound) for k in averaged)


def test_an_upload_that_secure_aggregation_would_clip_drops_its_client_saying_why(imagefolder, tmp_path):
    dropped = dropped_from_a_failed_round(tiny_config(imagefolder, tmp_path, rounds=1), InlineGrid(3),
                                          FlowerOptions(secure_aggregation=True, secagg_clipping_range=1e-4),
                                          "0 of 2 clients finished")
    assert len(dropped) == 2 and all("exceeds SecAgg+'s clipping range of +-0.0001: raise the run config's "
                                     "secagg-clipping-range" in line for line in dropped)


@pytest.mark.parametrize("changes, error", [({"method": "sl"}, "sl has none to average"),
                                            ({"clients_per_round": 1}, "needs 2 to 1023 clients a round"),
                                            ({"aggregator": "fedmedian"}, "fedmedian needs each client's upload"),
                                            ({"upload_clip": 1.0, "upload_epsilon": 0.5}, "raise it to 116 or more")])
def test_secure_aggregation_refuses_what_flower_cannot_do(imagefolder, tmp_path, changes, error):
    with pytest.raises(ConfigError, match=error):
        run_inline(tiny_config(imagefolder, tmp_path, **changes), InlineGrid(3), FlowerOptions(secure_aggregation=True))
    with pytest.raises(ConfigError, match="secagg-threshold is a share"):
        from_run_config({"secure-aggregation": True, "secagg-threshold": 2.0})


def test_a_config_is_fitted_to_the_supernodes_there_are():
    from sfprompt.flower.server_app import fitted_to_nodes

    asked = fitted_to_nodes(Config(clients=10, clients_per_round=5, probe_clients=10), 8)
    assert (asked.clients, asked.clients_per_round, asked.probe_clients) == (8, 5, 8)
    derived = fitted_to_nodes(Config(clients=10, clients_per_round=5), 3)
    assert (derived.clients, derived.clients_per_round, derived.probe_clients) == (3, 3, 3)


def test_secure_aggregation_refuses_a_probe_round_of_more_clients_than_its_sum_holds():
    from sfprompt.flower.settings import check_secure_aggregation

    many = Config(clients=1100, clients_per_round=5, probe_rounds=1, probe_clients=1100, train_samples=2000)
    with pytest.raises(ConfigError, match=r"needs 2 to 1023 clients a round .*, got 5 \(1100 in a probe round: "
                                          r"--probe-clients sets"):
        check_secure_aggregation(many, 64.0)
    check_secure_aggregation(many.replace(probe_clients=1000), 64.0)


def test_under_secure_aggregation_a_malformed_report_drops_the_round_it_is_averaged_into(imagefolder, tmp_path,
                                                                                         monkeypatch):
    from sfprompt.flower import secure

    reply = secure.upload_reply

    def lying(msg, tensors, num_examples, report):  # client 0's report claims a sample more than it has
        if report["meta"]["client"] == 0:
            report = {**report, "meta": {**report["meta"], "num_examples": num_examples + 1}}
        return reply(msg, tensors, num_examples, report)

    monkeypatch.setattr(client_app, "upload_reply", lying)
    dropped = dropped_from_a_failed_round(tiny_config(imagefolder, tmp_path, clients_per_round=3, rounds=1),
                                          InlineGrid(3), FlowerOptions(secure_aggregation=True), "0 of 3 clients finished")
    assert len(dropped) == 3 and "client 0 (phase upload): report claims" in dropped[0]
    assert all("the round's secure average includes client 0's upload, whose reply is unusable (upload: report "
               "claims" in line for line in dropped[1:])


def test_noised_uploads_are_masked_and_averaged_as_in_process(imagefolder, tmp_path):
    """--upload-epsilon under SecAgg+: each client noises its upload (noise of std 9.7 a value here), then Flower masks
    it; the server's average is the in-process run's average of the same noised uploads, within the quantisation."""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1, upload_clip=1.0,
                         upload_epsilon=1.0)
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    run_inline(config.replace(out=str(tmp_path / "secure")), InlineGrid(3), FlowerOptions(secure_aggregation=True))
    assert records(tmp_path / "secure")[0]["dropped"] == []
    local, secure = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "secure" / "global.safetensors")
    assert all(torch.allclose(local[k], secure[k], atol=1e-3) for k in local)
    assert max(float(t.abs().max()) for t in local.values()) > 5  # the noise is in it


def test_a_server_optimizer_steps_from_the_secure_average(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, clients=4, clients_per_round=3, rounds=2, aggregator="fedadam",
                         server_lr=0.01)
    run_inline(config.replace(out=str(tmp_path / "plain")), InlineGrid(4))
    run_inline(config.replace(out=str(tmp_path / "secure")), InlineGrid(4), FlowerOptions(secure_aggregation=True))
    plain, secure = load_file(tmp_path / "plain" / "global.safetensors"), load_file(tmp_path / "secure" / "global.safetensors")
    # Adam divides each step by its root mean square: a quantisation-sized difference stays small, not bounded alike
    assert all(torch.allclose(plain[k], secure[k], atol=1e-3) for k in plain)


def test_each_uploaded_tensor_is_scaled_by_its_public_size_so_a_large_bias_fits_beside_small_prompts():
    from sfprompt.flower.secure import scaled_upload, upload_scales

    broadcast = {"prompts": torch.full((1, 2, 4), 0.05), "tail.head.bias": torch.tensor([5000.0, -300.0])}
    scales = upload_scales(broadcast, ["prompts", "second_moment", "tail.head.bias"])
    assert scales == {"prompts": 1.0, "second_moment": 1.0, "tail.head.bias": 5000.0}
    task = {"secagg-scales": json.dumps(scales), "secagg-max-weight": 100.0, "secagg-clipping-range": 8.0}
    upload = {"prompts": torch.full((1, 2, 4), 0.06), "second_moment": torch.full((4, 4), 3.0),
              "tail.head.bias": torch.tensor([6000.0, -250.0])}
    scaled = scaled_upload(0, upload, 50, task)
    assert torch.equal(scaled["tail.head.bias"], torch.tensor([1.2, -0.05], dtype=torch.float64))
    assert torch.equal(scaled["prompts"], upload["prompts"].double())
    with pytest.raises(ClientFailure, match=r"upload value of 2e\+05 \(in tail.head.bias, over its scale 5000\)"):
        scaled_upload(0, {**upload, "tail.head.bias": torch.tensor([2e5, 0.0])}, 50, task)


def test_under_secure_aggregation_a_round_with_one_contributor_is_not_unmasked(imagefolder, tmp_path, monkeypatch):
    fail_in_split(monkeypatch, lambda cid: cid != 0)  # every client but the first of the round fails
    dropped = dropped_from_a_failed_round(tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, rounds=1),
                                          InlineGrid(3), FlowerOptions(secure_aggregation=True), "0 of 3 clients finished")
    assert len(dropped) == 3 and "dropped client 0 (phase upload): fewer than 2 clients contributed, so the round " \
        "was not unmasked" in dropped[0] and all("battery died" in line for line in dropped[1:])


def test_a_plain_upload_cannot_claim_to_speak_for_other_clients(imagefolder, tmp_path, monkeypatch):
    train = client_app.train

    def inflating(msg, context):  # a node's upload claims to aggregate 1000 clients
        reply = train(msg, context)
        record = reply.content["sfprompt"]
        record["meta"] = json.dumps({**json.loads(record["meta"]), "aggregates": 1000})
        return reply

    monkeypatch.setattr(client_app, "train", inflating)
    with pytest.raises(RoundFailed, match="2 of 3 clients finished, fewer than --min-clients 3"):
        run_inline(tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=3, min_clients=3, rounds=1),
                   InlineGrid(3, lost=(2,)))


def test_a_secure_round_that_loses_too_many_clients_before_unmasking_says_so(imagefolder, tmp_path):
    dropped = dropped_from_a_failed_round(
        tiny_config(imagefolder, tmp_path, clients_per_round=3, rounds=1, client_timeout_s=30.0),
        VanishingGrid(3, vanishing=(1, 2)), FlowerOptions(secure_aggregation=True), "0 of 3 clients finished")
    assert "dropped client 0 (phase upload): too few clients stayed in the protocol to unmask the round" in dropped[0]
    assert all("no upload in the secure aggregation's masking stage" in line for line in dropped[1:])
