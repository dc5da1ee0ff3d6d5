"""What the distributed runtime costs, measured on this machine (the runtime section of docs/benchmarks/index.md).

1. Per-batch overhead of the body channel: one split-training exchange (forward + backward request)
   in-process against the same exchange over gRPC to a body server in another process, and against
   Flower message round trips carrying the same payload in a Flower simulation. The body is an
   identity here, so that only the transport is timed; the real body's compute per exchange is
   given beside it for scale.
2. Wall time of one SFPrompt round with 10 clients, in-process against Flower simulation + channel,
   on Fashion-MNIST with the real ViT-S/14 from ../shared.

    python benchmarks/runtime.py [--shared ../shared] [--out runs/runtime]     # about 5 minutes
    python benchmarks/runtime.py --cases vit-s-56 --repeats 2 --train-samples 20 --test-samples 10  # a test's size

It prints a Markdown report and writes it to docs/benchmarks/runtime.md, which docs/benchmarks/index.md includes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import torch

from sfprompt.channel import BodyChannelServer, ChannelLink
from sfprompt.codec import Message
from sfprompt.config import Config, recipe_options
from sfprompt.meter import Meter
from sfprompt.model import SplitViT, create_vit
from sfprompt.server import BodyServer
from sfprompt.transport import InProcessLink, SessionLink
from write_benchmarks import command_line, publish

TOKEN, SESSION = "benchmark", "benchmark-session"
# --cases: the payloads of the benchmark's model and of ViT-B/16 at 224 px, as (row name, model, image size).
CASES = {"vit-s-56": ("ViT-S/14, 56 px, batch 32", "vit_small_patch14_dinov2", 56),
         "vit-b-224": ("ViT-B/16, 224 px, batch 32", "vit_base_patch16_224", 224)}


def split_model(model: str, size: int, identity_body: bool = True) -> SplitViT:
    torch.manual_seed(0)
    split = SplitViT(create_vit(model, 10, size, "none"), 10, 0, seed=0)
    if identity_body:  # what crosses the wire is unchanged; the server computes nothing
        split.body.blocks = torch.nn.Identity()
    return split


def serve(model: str, size: int, addresses, stop) -> None:
    torch.set_num_threads(1)
    server = BodyServer(split_model(model, size), Meter(), torch.device("cpu"))
    server.admit("0", SESSION)
    with BodyChannelServer(server, "127.0.0.1:0", TOKEN) as channel:
        addresses.put(channel.address)
        stop.wait()


def exchange_seconds(link, model: SplitViT, batch: int, repeats: int) -> tuple[list[float], int]:
    """Seconds of each forward + backward exchange, and the bytes one exchange moves."""
    tokens = torch.randn(batch, model.layout.length, model.layout.width)
    times, meter, link = [], link.meter, SessionLink(link, "0", SESSION)
    for i in range(repeats + 3):  # three warm-up exchanges
        meter.take()
        started = time.perf_counter()
        rows = link.request(Message("forward", {"tokens": tokens}), "split").tensors["rows"]
        link.request(Message("backward", {"grad": torch.ones_like(rows)}), "split")
        if i >= 3:
            times.append(time.perf_counter() - started)
    record = meter.take()
    return times, record["bytes_up"] + record["bytes_down"]


def in_process(model: SplitViT) -> InProcessLink:
    server = BodyServer(model, Meter(), torch.device("cpu"))
    server.admit("0", SESSION)
    return InProcessLink(server, Meter(), torch.device("cpu"))


def channel_overhead(cases: list[str], repeats: int) -> list[dict]:
    torch.set_num_threads(1)  # both sides on one core each: the comparison is of the transport
    context = multiprocessing.get_context("spawn")
    rows = []
    for name, model_name, size in (CASES[case] for case in cases):
        model = split_model(model_name, size)
        local, nbytes = exchange_seconds(in_process(model), model, 32, repeats)
        real = split_model(model_name, size, identity_body=False)
        compute, _ = exchange_seconds(in_process(real), real, 32, 3)
        addresses, stop = context.Queue(), context.Event()
        process = context.Process(target=serve, args=(model_name, size, addresses, stop), daemon=True)
        process.start()
        with ChannelLink(addresses.get(timeout=300), TOKEN, Meter(), torch.device("cpu")) as link:
            remote, _ = exchange_seconds(link, model, 32, repeats)
        stop.set()
        process.join(30)
        flower = flower_round_trip(nbytes // 2, repeats)
        rows.append({"case": name, "bytes_per_exchange": nbytes, "in_process_s": statistics.median(local),
                     "channel_s": statistics.median(remote), "flower_message_s": statistics.median(flower),
                     "real_body_compute_s": statistics.median(compute)})
    return rows


def flower_round_trip(payload_bytes: int, repeats: int) -> list[float]:
    """Seconds per Flower message round trip (two per exchange, as split training would need)."""
    from flwr.app import ConfigRecord, Context, Message as FlowerMessage, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    server_app, client_app, times = ServerApp(), ClientApp(), []

    @client_app.query()
    def echo(msg: FlowerMessage, context: Context) -> FlowerMessage:
        return FlowerMessage(RecordDict({"x": ConfigRecord({"payload": msg.content["x"]["payload"]})}), reply_to=msg)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        while not (nodes := list(grid.get_node_ids())):  # the SuperNode registers shortly after start
            time.sleep(0.1)
        node = nodes[0]
        payload = bytes(payload_bytes)
        for i in range(repeats + 3):
            started = time.perf_counter()
            for _ in range(2):  # forward and backward
                message = FlowerMessage(RecordDict({"x": ConfigRecord({"payload": payload})}), dst_node_id=node,
                                        message_type=MessageType.QUERY)
                list(grid.send_and_receive([message]))
            if i >= 3:
                times.append(time.perf_counter() - started)

    run_simulation(server_app, client_app, num_supernodes=1, backend_config={"client_resources": {"num_cpus": 1}})
    return times


def round_wall_time(shared: Path, out: Path, train_samples: int, test_samples: int) -> dict:
    from flwr.simulation import run_simulation

    from sfprompt.flower import client_app, server_app
    from sfprompt.flower.settings import as_run_config
    from sfprompt.runner import run

    torch.set_num_threads(2)
    config = Config(**recipe_options("paper"), dataset="fashion-mnist", data_dir=str(shared / "data"),
                    weights=str(shared / "models" / "vit_small_patch14_dinov2.imgfocus.safetensors"),
                    train_samples=train_samples, test_samples=test_samples, clients=10, clients_per_round=10, rounds=1, device="cpu")
    result = {}
    for name in ("in-process", "flower"):
        config_n = config.replace(out=str(out / name))
        started = time.perf_counter()
        if name == "in-process":
            run(config_n, progress=False, log=lambda _: None)
        else:
            run_simulation(server_app.make_app(as_run_config(config_n)), client_app.app, num_supernodes=10)
        record = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        result[name] = {"round_s": record["seconds"], "total_s": time.perf_counter() - started,
                        "accuracy": record["accuracy"], "bytes_up": record["bytes_up"], "bytes_down": record["bytes_down"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("runs/runtime"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--train-samples", type=int, default=2500)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/runtime.md"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    overhead = channel_overhead(args.cases, args.repeats)
    rounds = round_wall_time(args.shared, args.out, args.train_samples, args.test_samples)
    (args.out / "runtime.json").write_text(json.dumps({"overhead": overhead, "round": rounds}, indent=2) + "\n")

    changed = [f"--{name.replace('_', '-')} {' '.join(value) if name == 'cases' else value}"  # what re-runs it
               for name in ("repeats", "cases", "train_samples", "test_samples")
               if (value := getattr(args, name)) != parser.get_default(name)]
    lines = [command_line(" ".join(["python benchmarks/runtime.py", *changed])),
             "",
             "| one split-training exchange (forward + backward), transport only | bytes | in-process (codec) "
             "| body channel (gRPC, another process) | channel overhead | as 2 Flower message round trips "
             "| the real body's compute, for scale |",
             "|---|---|---|---|---|---|---|"]
    for r in overhead:
        lines.append(f"| {r['case']} | {r['bytes_per_exchange'] / 1e6:.2f} MB | {1e3 * r['in_process_s']:.1f} ms "
                     f"| {1e3 * r['channel_s']:.1f} ms | {1e3 * (r['channel_s'] - r['in_process_s']):+.1f} ms "
                     f"| {1e3 * r['flower_message_s']:.0f} ms | {1e3 * r['real_body_compute_s']:.0f} ms |")
    lines += ["", f"| one SFPrompt round, 10 clients, ViT-S/14 on Fashion-MNIST ({args.train_samples:,} samples) "
              "| round wall time | whole run (setup included) | accuracy | MB up | MB down |", "|---|---|---|---|---|---|"]
    for name, r in rounds.items():
        lines.append(f"| {name} | {r['round_s']:.0f} s | {r['total_s']:.0f} s | {r['accuracy']:.4f} "
                     f"| {r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} |")
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
