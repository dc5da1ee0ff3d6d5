"""The Flower ClientApp: one client's round, run by the same `Client` code as the in-process runtime.

The server sends the run's resolved config, so a client rebuilds exactly the server's data
partition and frozen model (`federation.prepare`) and picks its own partition; its private local
classifier persists between rounds in `Context.state`. Split-training batches go to the body server
over the body channel; the upload and this client's measurements go back as a Flower reply.
"""

from __future__ import annotations

import json
import secrets

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..channel import ChannelLink
from ..client import ClientFailure
from ..codec import decode
from ..config import Config
from ..federation import prepare
from ..transport import SessionLink

app = ClientApp()
LOCAL_HEAD = "sfprompt.local-head"
PRIVATE_SEED = "sfprompt.private-seed"


def node_private_seed(context: Context) -> int:
    """The secret behind this node's defence randomness (noise, shuffles, randomized labels): its node
    config's `private-seed` when set (a reproducible experiment), otherwise drawn once from the
    operating system's entropy and kept in the node's state. The server never sees it."""
    if "private-seed" in context.node_config:
        return int(context.node_config["private-seed"])
    if PRIVATE_SEED not in context.state:
        context.state[PRIVATE_SEED] = ConfigRecord({"seed": secrets.randbits(63)})
    return int(context.state[PRIVATE_SEED]["seed"])


def node_partition(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) of this SuperNode, from its node config."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError:
        raise ValueError("this SuperNode has no partition: start it with "
                         "--node-config 'partition-id=K num-partitions=N'") from None


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Which data partition this SuperNode holds."""
    partition, partitions = node_partition(context)
    return Message(RecordDict({"sfprompt": ConfigRecord({"partition-id": partition, "num-partitions": partitions})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task = msg.content["sfprompt"]
    partition, _ = node_partition(context)
    if int(task["partition"]) != partition:
        raise ValueError(f"asked to train partition {task['partition']}, but this SuperNode holds partition {partition}")
    config = Config.from_dict(json.loads(task["config"]))
    if "data-dir" in context.node_config:  # where this machine keeps the dataset, if not where the server does
        config = config.replace(data_dir=str(context.node_config["data-dir"]))
    fed = prepare(config)
    if fed.method.split:
        fed.model.drop_body()  # it runs on the body server; a client only keeps what it runs
    client = fed.clients[int(task["partition"])]
    client.private_seed = node_private_seed(context)
    if LOCAL_HEAD in context.state:
        client.local_head.load_state_dict(context.state[LOCAL_HEAD].to_torch_state_dict())
    root = task["body-root-certificate"] or None
    try:
        with ChannelLink(task["body-address"], task["body-token"], fed.meter, fed.device,
                         root_certificate=root, timeout_s=float(task["body-timeout-s"]),
                         max_bytes=fed.max_message_bytes) as channel:
            link = SessionLink(channel, client.cid, task["session"])
            global_params = decode(task["global"], fed.device, fed.max_message_bytes)
            upload = client.run_round(fed.method, global_params, link, int(task["seed"]), fed.config.client_timeout_s)
    except ClientFailure as failure:  # the server drops this client from the round, and says why
        reply = ConfigRecord({"failure": json.dumps(failure.record()), "meter": json.dumps(fed.meter.counts())})
        return Message(RecordDict({"sfprompt": reply}), reply_to=msg)
    context.state[LOCAL_HEAD] = ArrayRecord(client.local_head.state_dict())
    reply = ConfigRecord({"upload": upload, "meter": json.dumps(fed.meter.counts())})
    return Message(RecordDict({"sfprompt": reply}), reply_to=msg)
