"""Secure aggregation of the uploads with Flower's SecAgg+: the server learns each round's weighted average only.

Flower 1.42 runs SecAgg+ in its legacy generation: `SecAggPlusWorkflow` (ServerApp) drives four stages of
`train` messages through a `LegacyContext` and a legacy strategy, and `secaggplus_mod` (ClientApp) answers
them, calling the ClientApp's own train handler in the third stage for the upload it masks. Here one round of
the runner's loop runs as that protocol: `secure_average` pins the round's sampled nodes and their tasks in a
strategy, runs Flower's workflow, and returns the unmasked average and each node's report; on the client,
`client_mod` hands the protocol's messages to Flower's mod, and `upload_reply` is what the train handler
answers inside it. The masking, quantisation and dropout recovery are Flower's, not ours.

What the server still sees of each client, in the clear: its sample count (the average's weight), its losses
and kept samples, its meter, and whether it failed; not a single tensor of its upload. SecAgg+ covers the
uploads only: the split-phase messages (activations and gradients) reach the body server as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..client import ClientFailure
from ..meter import DOWN, UP, Meter
from .records import as_numpy

TASK = "fitins.config"  # where a task sits in the protocol's third-stage message (a legacy FitIns's config)
REPORT = "sfprompt"  # the key of a client's report (its upload's meta, its meter, a failure) in the FitRes metrics
# Flower quantises each weighted value (and each weight) into 2**22 levels and sums them modulo 2**32: at 1,024
# clients a round of full weights the summed weights wrap to 0.
MAX_CLIENTS = 2**32 // 2**22 - 1


@dataclass
class SecureRound:
    """What the server holds after one round of SecAgg+."""

    average: list[np.ndarray] | None  # the uploads' weighted average, in name order; None: nothing was unmasked
    reports: dict[int, tuple[int, object]]  # node -> (sample count, report as it came: JSON, unchecked) of each
    # node whose masked upload arrived
    errors: dict[int, str]  # node -> the error Flower replied with, for a node whose ClientApp failed outright
    halted: str | None = None  # why the protocol stopped before unmasking, when this module stopped it


def secure_average(grid, meter: Meter, round_: int, tasks: Mapping[int, ConfigRecord], broadcast: list[torch.Tensor],
                   max_weight: float, clipping_range: float, threshold: float, timeout: float | None) -> SecureRound:
    """Run one round's training and upload as Flower's SecAgg+ protocol on the nodes of `tasks` (node -> its task),
    each sent `broadcast` (the global state's tensors in name order) as its FitIns's parameters.

    Every byte the protocol exchanges is counted on `meter`: the masked upload as `upload`, the keys, shares and
    their ciphertexts as `secagg`.
    """
    strategy = _PinnedNodes(grid, tasks, ndarrays_to_parameters([as_numpy(tensor) for tensor in broadcast]))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _GuardedSecAggPlus(num_shares=1.0, reconstruction_threshold=threshold, max_weight=max_weight,
                                  clipping_range=clipping_range, timeout=timeout)
    measured = _MeasuredGrid(grid, meter)
    workflow(measured, context)
    return SecureRound(strategy.average, strategy.reports, measured.errors, strategy.halted)


class _GuardedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, which keeps every masked upload's report as it arrives (whatever happens next) and
    stops before unmasking when fewer than two clients contributed: a failed client answers with no weight
    (`upload_reply`), so the protocol would otherwise complete, and the 'average' of one upload is that upload."""

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        going_on = super().collect_masked_vectors_stage(grid, context, state)
        strategy = context.strategy
        strategy.reports = {proxy.node_id: (res.num_examples, res.metrics.get(REPORT)) for proxy, res in state.legacy_results}
        if not going_on:
            strategy.halted = "too few clients stayed in the protocol to unmask the round (Flower's threshold)"
        elif sum(count > 0 for count, _ in strategy.reports.values()) < 2:
            strategy.halted = ("fewer than 2 clients contributed, so the round was not unmasked (its average would be "
                               "one client's upload)")
            going_on = False
        return going_on


class _PinnedNodes(FedAvg):
    """The legacy strategy the workflow asks for the round's clients and hands the unmasked average to: the nodes
    and tasks the runner chose (sampling stays the runner's), with the broadcast as their parameters, and the
    average kept as it comes (every result's parameters are the same unmasked average; FedAvg over them would only add
    rounding)."""

    def __init__(self, grid, tasks: Mapping[int, ConfigRecord], broadcast: Parameters) -> None:
        super().__init__()
        self.grid, self.tasks, self.broadcast = grid, tasks, broadcast
        self.average: list[np.ndarray] | None = None
        self.reports: dict[int, tuple[int, object]] = {}
        self.halted: str | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, 0), FitIns(self.broadcast, dict(task)))
                for node, task in self.tasks.items()]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _MeasuredGrid:
    """The run's grid, counting each SecAgg+ message's protocol record (Flower's protobuf encoding of it) on the
    meter; the tasks beside it (the broadcast, the control fields) are counted as in a plain round."""

    def __init__(self, grid, meter: Meter) -> None:
        self.grid, self.meter = grid, meter
        self.errors: dict[int, str] = {}  # node -> the error Flower replied with

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            self.meter.count_bytes(DOWN, "secagg", len(message.content.config_records[RECORD_KEY_CONFIGS].deflate()))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))  # the workflow reads them twice
        for reply in replies:
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = f"Flower error {reply.error.code}: {reply.error.reason}"
            elif RECORD_KEY_CONFIGS in reply.content.config_records:
                record = reply.content.config_records[RECORD_KEY_CONFIGS]
                self.meter.count_bytes(UP, "upload" if Key.MASKED_PARAMETERS in record else "secagg",
                                       len(record.deflate()))
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def broadcast_of(msg: Message, names: list[str]) -> dict[str, torch.Tensor]:
    """The broadcast in the protocol's third-stage message (its FitIns's parameters: the tensors of `names`, the
    global state's, in that order)."""
    arrays = parameters_to_ndarrays(compat.recorddict_to_fitins(msg.content, keep_input=True).parameters)
    if len(arrays) != len(names):
        raise ValueError(f"the broadcast holds {len(arrays)} arrays, not the {len(names)} of the global state")
    return {name: torch.from_numpy(np.array(array)) for name, array in zip(names, arrays)}


def client_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for the messages of its protocol; a plain round's `train` message passes."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def upload_reply(msg: Message, tensors: Mapping[str, torch.Tensor], num_examples: int, report: dict) -> Message:
    """The train handler's answer inside the protocol: the upload's tensors (in name order) with their sample count,
    which Flower's mod weights, quantises and masks, and the client's report beside them (in the clear). A failed
    client answers zeros with no weight, so that its masks still cancel and it adds nothing to the average."""
    arrays = [tensors[name].detach().cpu().double().numpy() for name in sorted(tensors)]
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {REPORT: json.dumps(report)})
    return Message(compat.fitres_to_recorddict(result, keep_input=False), reply_to=msg)


def upload_scales(broadcast: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    """What each tensor of the upload is divided by before Flower quantises it (and the average multiplied by after):
    its largest value in the broadcast, at least 1 (1 for a tensor the broadcast does not hold). Flower clips every
    value to one range, while a probe-fitted classifier's bias reaches thousands and the prompts stay below 0.1;
    scaled, the bias fits the range the prompts are quantised in (each value's step is about 3e-5 times its tensor's
    scale). The scales come from the broadcast, so they tell nobody anything."""
    return {name: max(1.0, float(broadcast[name].abs().max())) if name in broadcast and broadcast[name].numel() else 1.0
            for name in names}


def scaled_upload(cid: int, tensors: Mapping[str, torch.Tensor], num_examples: int, task) -> dict[str, torch.Tensor]:
    """The upload divided by the round's public scales (`secagg-scales`), for Flower to mask. Raises `ClientFailure`
    when Flower would clip it: it multiplies every value by the client's weight (its sample count over the round's
    `secagg-max-weight`) and clips it to +-`secagg-clipping-range`, which would change the average without a word."""
    scales = json.loads(task["secagg-scales"])
    scaled = {name: tensor.double() / scales[name] for name, tensor in tensors.items()}
    ratio = num_examples / float(task["secagg-max-weight"])
    bound = float(task["secagg-clipping-range"])
    largest, name = max((float(t.abs().max()), name) for name, t in scaled.items() if t.numel())
    if largest * ratio > bound:
        raise ClientFailure(cid, "upload", f"an upload value of {largest * scales[name]:.4g} (in {name}, over its scale "
                            f"{scales[name]:.4g}), weighted by {ratio:.3g}, exceeds SecAgg+'s clipping range of "
                            f"+-{bound:g}: raise the run config's secagg-clipping-range")
    return scaled
