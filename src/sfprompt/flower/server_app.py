"""The Flower ServerApp: the in-process round loop with Flower carrying the clients' work.

It finds which SuperNode holds which partition, starts the body server and its channel, and runs
`runner.run` with a `FlowerRuntime`: each round the sampled clients get the global params (as the
codec's bytes, counted exactly as in-process), run their phases, and reply with their upload and
their measurements. Sampling, FedAvg, evaluation, metrics and checkpoints are the runner's own.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from logging import INFO
from typing import Any, Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ..channel import BodyChannelServer
from ..codec import Message as Payload
from ..codec import encoded_size
from .. import runs
from ..config import Config, ConfigError
from ..meter import DOWN, UP
from ..federation import Federation
from ..seeds import client_seed
from ..runner import run, weighted_mean
from ..server import BodyServer, body_optimizer
from ..splits import affordable_split, head_gflop
from .records import from_arrays, to_arrays
from .secure import secure_average, upload_scales
from .settings import FlowerOptions, check_secure_aggregation, from_run_config

MAX_BODY_WORKERS = 1024  # the body channel's threads, whatever the clients a round (a probe round asks every one)


class FlowerRuntime:
    """Runs the clients' part of a round on the SuperNodes holding their partitions."""

    def __init__(self, fed: Federation, grid: Grid, nodes: dict[int, int], options: FlowerOptions,
                 folder_sizes: Mapping[int, int] | None = None, budgets: Mapping[int, float] | None = None) -> None:
        self.fed, self.grid, self.nodes, self.options = fed, grid, nodes, options
        if options.secure_aggregation:
            check_secure_aggregation(fed.config, options.secagg_clipping_range)  # clients-per-round as capped
        self.caps = {cid: self._cap(cid, (folder_sizes or {}).get(cid)) for cid in nodes}
        self.splits = self._splits(budgets or {})
        self._run_key: str | None = None
        tls = options.tls()
        self.body = BodyServer(fed.model, fed.meter, fed.device,
                               body_optimizer(fed.settings) if fed.config.train_body else None,
                               pending_timeout_s=options.body_timeout_s,
                               batch_window_s=options.body_batch_window_s if options.body_batching else None,
                               batch_samples=options.body_batch_samples or None)
        self.token = options.resolved_token()
        # A request waits in its worker while its batch gathers: a worker for every client of a round (a probe
        # round's too, and as many again for stragglers of the last), so that a batch can hold every client at once;
        # at most MAX_BODY_WORKERS threads (beyond, a batch waits out its window rather than fill).
        self.channel = BodyChannelServer(self.body, options.body_address, self.token,
                                         certificate=tls[0] if tls else None, private_key=tls[1] if tls else None,
                                         workers=min(max(16, 2 * fed.config.most_clients_a_round), MAX_BODY_WORKERS),
                                         max_bytes=fed.max_message_bytes)
        self.root_certificate = tls[2] if tls else b""
        self.public_address = options.body_public_address or self.channel.address
        log(INFO, "body server listening on %s (clients dial %s)%s", self.channel.address, self.public_address,
            " with TLS" if tls else "")

    def train(self, round_: int, cids: list[int], global_params) -> tuple[list[Payload], list[dict]]:
        fed = self.fed
        method = fed.method.stage(round_, fed.config)  # the run's method, or a probe round opening or closing it
        shared = method.broadcast(global_params.state_dict())
        size = encoded_size(Payload("global", shared))  # counted as the in-process runtime counts the broadcast
        tasks = {}
        for cid in cids:
            fed.meter.count_bytes(DOWN, "broadcast", size)
            tasks[cid] = self.task(cid, round_)
        if self.options.secure_aggregation:
            return self._train_securely(round_, tasks, global_params, shared)
        arrays = to_arrays(shared)
        messages = [Message(RecordDict({"global": arrays, "sfprompt": task}), dst_node_id=self.nodes[cid],
                            message_type=MessageType.TRAIN) for cid, task in tasks.items()]
        timeout = fed.config.client_timeout_s
        uploads, failures = {}, {}
        partition = {node: cid for cid, node in self.nodes.items()}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in partition or node in uploads or node in failures:
                continue  # not a reply to this round's messages
            try:
                uploads[node] = self._upload(reply, self.caps[partition[node]])
            except Dropped as dropped:
                failures[node] = {"phase": dropped.phase, "reason": dropped.reason}
        dropped = []
        for cid in cids:
            if self.nodes[cid] not in uploads:
                failure = failures.get(self.nodes[cid], {"phase": "unknown", "reason": f"no reply within {timeout} s"})
                dropped.append({"client": cid, "phase": failure["phase"], "reason": failure["reason"]})
                self.body.forget(str(cid))
        return [uploads[self.nodes[cid]] for cid in cids if self.nodes[cid] in uploads], dropped

    def _train_securely(self, round_: int, tasks: dict[int, ConfigRecord], global_params,
                        broadcast: dict[str, torch.Tensor]) -> tuple[list[Payload], list[dict]]:
        """The round as Flower's SecAgg+ protocol (`secure`): one upload back, the average of the clients' uploads
        weighted by their samples, which the server cannot take apart. A client that fails answers with no weight
        and is dropped. No average comes back when fewer than two clients contributed, or when a contributing
        client's report is malformed or claims more samples than its cap (its upload is inside the average, which
        cannot be taken apart): the round's contributors are then dropped too, saying why."""
        max_weight = float(max(self.caps[cid] for cid in tasks))  # the largest weight a client may claim
        state, names = global_params.state_dict(), sorted(global_params.state_dict())
        scales = upload_scales(broadcast, names)
        for task in tasks.values():
            task["secagg-max-weight"], task["secagg-clipping-range"] = max_weight, self.options.secagg_clipping_range
            task["secagg-scales"] = json.dumps(scales)
        result = secure_average(self.grid, self.fed.meter, round_, {self.nodes[c]: t for c, t in tasks.items()},
                                [broadcast[name] for name in sorted(broadcast)], max_weight,
                                self.options.secagg_clipping_range, self.options.secagg_threshold,
                                self.fed.config.client_timeout_s)
        metas, dropped, unusable = {}, [], None
        for cid in tasks:
            node = self.nodes[cid]
            try:
                if node not in result.reports:
                    raise Dropped("unknown", result.errors.get(node, "no upload in the secure aggregation's masking stage"))
                count, report = result.reports[node]
                try:
                    metas[cid] = self._report(report, count, self.caps[cid])
                except Dropped as failure:
                    if count > 0:  # inside the average: it cannot be taken out
                        unusable = unusable or f"the round's secure average includes client {cid}'s upload, whose " \
                                               f"reply is unusable ({failure})"
                    raise
            except Dropped as failure:
                dropped.append({"client": cid, "phase": failure.phase, "reason": failure.reason})
                self.body.forget(str(cid))
        if result.average is not None and len(result.average) != len(names):
            unusable = f"the round's secure average holds {len(result.average)} arrays, not the {len(names)} of the state"
        if unusable or result.average is None:
            why = unusable or result.halted or "the secure aggregation failed while unmasking (see Flower's log)"
            for cid in metas:
                dropped.append({"client": cid, "phase": "upload", "reason": why})
                self.body.forget(str(cid))
            return [], sorted(dropped, key=lambda failure: failure["client"])
        weights = [metas[cid]["num_examples"] for cid in metas]
        meta = {"client": "secure aggregate", "aggregates": len(metas), "num_examples": sum(weights),
                "kept": sum(m["kept"] for m in metas.values()),
                **{key: weighted_mean([m.get(key) for m in metas.values()], weights) for key in ("train_loss", "local_loss")}}
        tensors = {name: (torch.from_numpy(array) * scales[name]).to(state[name].device, state[name].dtype)
                   for name, array in zip(names, result.average)}
        return [Payload("update", tensors, meta)], dropped

    def _report(self, text, count: int, cap: int) -> dict:
        """A client's report beside its masked upload (JSON: its meter, and its upload's meta or its failure), checked
        like a plain reply's (`_upload`); returns the meta."""
        try:
            report = json.loads(text)
            self.fed.meter.merge(report["meter"])
            if "failure" in report:
                raise Dropped(str(report["failure"]["phase"]), str(report["failure"]["reason"]))
            meta = dict(report["meta"])
        except (KeyError, TypeError, ValueError) as err:
            raise Dropped("reply", f"report is malformed: {type(err).__name__}: {err}") from None
        if meta.get("num_examples") != count or not (isinstance(count, int) and 0 < count <= cap):
            raise Dropped("upload", f"report claims {meta.get('num_examples')!r} examples and the protocol {count!r}, "
                          f"not one count of at most its cap of {cap}")
        return meta

    def task(self, cid: int, round_: int) -> ConfigRecord:
        """What a client gets for a round beside the broadcast (an ArrayRecord, counted as the in-process runtime
        counts it): the control fields (the run's config and class names, its partition, seeds, split point,
        session, body address, token and certificate; about 1.7 KB, more with a certificate), which are not
        counted."""
        return ConfigRecord({
            "config": json.dumps(self.fed.config.to_dict()), "partition": cid, "round": round_,
            "classes": json.dumps(self.fed.data.classes),
            "seed": client_seed(self.fed.config.seed, round_, cid), "client-blocks": self.splits[cid],
            "session": self.body.admit(str(cid), client_blocks=self.splits[cid]),
            "run-key": self.run_key(), "body-address": self.public_address,
            "body-token": self.token, "body-root-certificate": self.root_certificate,
            "body-timeout-s": self.options.body_timeout_s,
        })

    def run_key(self) -> str:
        """The run's name on the SuperNodes (where they keep its private classifiers): new for a new run,
        the same when it resumes; kept in the run folder (`node-state-key`)."""
        path = Path(self.fed.config.out) / "node-state-key"
        if self._run_key is None:
            if self.options.resume and path.is_file():
                self._run_key = path.read_text().strip()
            else:
                self._run_key = secrets.token_hex(16)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self._run_key)
        return self._run_key

    def _splits(self, budgets: Mapping[int, float]) -> dict[int, int]:
        """Where each client's head ends: the deepest its node's `budget-gflop` affords, for a node that
        reports one; otherwise as in simulation (the run's --client-budgets draw, or --client-blocks)."""
        splits = {cid: self.fed.clients[cid].model.client_blocks for cid in self.nodes}
        if budgets and self.fed.method.split:
            if self.fed.config.train_body:
                raise ConfigError("SuperNodes report compute budgets (budget-gflop), but --train-body trains one "
                                  "body for a single split point")
            costs = head_gflop(self.fed.model)
            splits |= {cid: affordable_split(costs, budget) for cid, budget in budgets.items() if cid in splits}
            log(INFO, "each client's head ends after (partition: blocks): %s", splits)
        return splits

    def _cap(self, cid: int, folder_size: int | None) -> int:
        """The most examples client `cid` may claim (its upload's FedAvg weight): its partition's size,
        which the server knows; for a node with its own folder, what it reported when the run began,
        at most `max-examples` when set."""
        if folder_size is None:
            return self.fed.clients[cid].num_examples
        return min(folder_size, self.options.max_examples) if self.options.max_examples else folder_size

    def _upload(self, reply: Message, partition_size: int) -> Payload:
        """The upload in a ClientApp's reply, after adding its measurements to the run's meter.

        The reply comes from another machine, so nothing in it is trusted: an error, a reported
        failure, a malformed record, or a sample count (the upload's FedAvg weight) larger than the
        client's cap (`_cap`) raises `Dropped`, and the round goes on without that client."""
        if reply.has_error():  # the ClientApp crashed outside its phases
            raise Dropped("unknown", f"Flower error {reply.error.code}: {reply.error.reason}")
        try:
            record = reply.content["sfprompt"]
            self.fed.meter.merge(json.loads(record["meter"]))
            if "failure" in record:
                failure = json.loads(record["failure"])
                raise Dropped(str(failure["phase"]), str(failure["reason"]))
            meta, arrays = json.loads(record["meta"]), reply.content.array_records["upload"]
            if not isinstance(meta, dict):
                raise TypeError(f"meta is {type(meta).__name__}, not an object")
        except (KeyError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            raise Dropped("reply", f"malformed reply: {type(err).__name__}: {err}") from None
        try:
            payload = Payload("update", from_arrays(arrays), meta)
            size = encoded_size(payload)  # the upload as the codec encodes it: the bytes both runtimes count
        except (TypeError, ValueError) as err:  # CodecError is a ValueError
            raise Dropped("upload", f"unreadable upload: {type(err).__name__}: {err}") from None
        if size > self.fed.max_message_bytes:
            raise Dropped("upload", f"upload of {size} bytes exceeds the run's {self.fed.max_message_bytes}-byte limit")
        self.fed.meter.count_bytes(UP, "upload", size)
        payload.tensors = {name: tensor.to(self.fed.device) for name, tensor in payload.tensors.items()}
        payload.meta.pop("aggregates", None)  # only the secure runtime's own average speaks for several clients
        count = payload.meta.get("num_examples")
        if isinstance(count, int) and count > partition_size:
            raise Dropped("upload", f"upload claims {count} examples, more than its cap of {partition_size}")
        return payload

    def end_round(self) -> None:
        self.body.end_round()

    def close(self) -> None:
        try:
            self.channel.stop()
        finally:
            self.body.close()


class Dropped(Exception):
    """A client's reply that drops it from the round: the phase it failed in and why."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase, self.reason = phase, reason


def find_partitions(grid: Grid, wait_s: float) -> tuple[dict[int, int], dict[int, int], dict[int, float]]:
    """(partition id -> node id, partition id -> images in the node's own folder, for nodes with one,
    partition id -> the node's compute budget, for nodes with one), once a SuperNode has reported for
    every partition."""
    deadline = time.monotonic() + wait_s
    nodes: dict[int, int] = {}
    folder_sizes: dict[int, int] = {}
    budgets: dict[int, float] = {}
    expected = None  # num-partitions, as the first SuperNode to answer reports it
    while True:
        known = set(nodes.values())
        queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
                   for node in grid.get_node_ids() if node not in known]
        for reply in grid.send_and_receive(queries, timeout=30) if queries else []:
            if reply.has_error():
                raise ConfigError(f"SuperNode {reply.metadata.src_node_id}: {reply.error.reason}")
            answer = reply.content["sfprompt"]
            partition, expected = int(answer["partition-id"]), int(answer["num-partitions"])
            if partition in nodes:
                raise ConfigError(f"two SuperNodes hold partition {partition}")
            nodes[partition] = reply.metadata.src_node_id
            if answer.get("data") == "folder":
                folder_sizes[partition] = int(answer["examples"])
            if "budget-gflop" in answer:
                budgets[partition] = float(answer["budget-gflop"])
        if nodes and set(nodes) == set(range(expected or len(nodes))):
            return dict(sorted(nodes.items())), folder_sizes, budgets
        if time.monotonic() > deadline:
            raise ConfigError(f"after {wait_s:.0f} s, SuperNodes hold partitions {sorted(nodes)}; "
                              "every partition 0..num-partitions-1 needs one")
        time.sleep(1.0)


def fitted_to_nodes(config: Config, nodes: int) -> Config:
    """`config` for the SuperNodes there are, one client each: a round samples at most all of them, and a probe
    round asks at most all of them (an explicit --probe-clients; a derived one follows the new counts)."""
    fitted = {"clients": nodes, "clients_per_round": min(config.clients_per_round, nodes)}
    if config.given()["probe_clients"] is not None:
        fitted["probe_clients"] = min(config.probe_clients, nodes)
    return config.replace(**fitted)


def make_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config starts from `defaults` (tests and embedding); `app` has none."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config, options = from_run_config({**(defaults or {}), **context.run_config})
        nodes, folder_sizes, budgets = find_partitions(grid, options.wait_for_nodes_s)
        if folder_sizes and config.client_holdout:
            raise ConfigError("client-holdout measures each client's held-out samples on the server, which holds the "
                              f"partitions it simulates but not the SuperNodes' own data folders ({sorted(folder_sizes)})")
        # `out`, or where the SuperLink runs a new folder under runs/ (or, to resume, the run runs/latest points at)
        config = runs.own_folder(fitted_to_nodes(config, len(nodes)), resume=options.resume)
        log(INFO, "%d SuperNodes, one partition each; %d sampled per round", len(nodes), config.clients_per_round)
        if folder_sizes:
            log(INFO, "SuperNodes with their own data (partition: images): %s; a node's FedAvg weight is at most "
                "that%s", folder_sizes, f" and {options.max_examples}" if options.max_examples else "")
        if budgets:
            log(INFO, "SuperNodes with a compute budget (partition: GFLOP per sample): %s", budgets)
        if options.secure_aggregation:
            log(INFO, "secure aggregation (SecAgg+): the server learns each round's average of the uploads, not one "
                "client's; the split-phase messages reach the body server as without it")
        run(config, progress=False, log=lambda line: log(INFO, "%s", line),
            runtime=lambda fed: FlowerRuntime(fed, grid, nodes, options, folder_sizes, budgets), resume=options.resume)

    return server_app


app = make_app()
