"""Load on the body channel: many concurrent clients, every batch answered once, nothing crossed.

A body server (tiny random ViT) runs in its own process; N client threads each run B
forward/backward exchanges over their own gRPC connection and session, with tokens unique to
(client, batch), and check every reply against the body computed locally. Reports throughput and
the server process's memory before and after.

    python benchmarks/body_load.py [--clients 32] [--batches 300]      # about 4 minutes on two cores

It prints a Markdown report and writes it to docs/benchmarks/load.md, which docs/benchmarks/index.md includes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import threading
import time
from pathlib import Path

import torch

from sfprompt.channel import BodyChannelServer, ChannelLink
from sfprompt.codec import Message
from sfprompt.meter import Meter
from sfprompt.model import SplitViT, create_vit
from sfprompt.server import BodyServer
from sfprompt.transport import SessionLink
from write_benchmarks import cpu_name, publish

TOKEN = "load"


def tiny_model() -> SplitViT:
    torch.manual_seed(0)
    return SplitViT(create_vit("test_vit", 4, 32, "none"), 3, 0, seed=0)


def session(client: int) -> str:
    return f"session-{client}"


def serve(clients: int, requests, replies) -> None:
    """The body server process: answers 'admit', 'stats' and 'stop' from the parent."""
    torch.set_num_threads(1)
    server = BodyServer(tiny_model(), Meter(), torch.device("cpu"))
    with BodyChannelServer(server, "127.0.0.1:0", TOKEN, workers=min(clients, 64)) as channel:
        replies.put(channel.address)
        while (command := requests.get()) != "stop":
            if command == "admit":
                server.end_round()
                for client in range(clients):
                    server.admit(str(client), session(client))
            replies.put({"pending": server.pending, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def tokens_for(model: SplitViT, client: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(client * 100_003 + batch)
    return torch.randn(2, model.layout.length, model.layout.width, generator=generator)


def drive(address: str, clients: int, batches: int, model: SplitViT) -> dict:
    """Run the clients concurrently; returns counts, errors and throughput."""
    answered = [0] * clients
    errors: list[str] = []

    def client(k: int) -> None:
        try:
            with ChannelLink(address, TOKEN, Meter(), torch.device("cpu")) as channel:
                link = SessionLink(channel, k, session(k))
                for b in range(batches):
                    tokens = tokens_for(model, k, b)
                    rows = link.request(Message("forward", {"tokens": tokens}), "split").tensors["rows"]
                    grad = link.request(Message("backward", {"grad": torch.ones_like(rows)}), "split").tensors["grad"]
                    with torch.no_grad():
                        expected = model.body(tokens)[:, model.layout.tail_rows]
                    if not torch.allclose(rows, expected, atol=1e-5) or grad.shape != tokens[:, model.messages.grad_rows].shape:
                        errors.append(f"client {k} batch {b}: a reply that is not its own")
                    answered[k] += 1
        except Exception as err:  # collected, reported, and failed on below
            errors.append(f"client {k}: {err}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    return {"answered": answered, "errors": errors, "seconds": seconds,
            "exchanges_per_s": sum(answered) / seconds}


def run_load(clients: int, batches: int) -> dict:
    torch.set_num_threads(1)
    context = multiprocessing.get_context("spawn")
    requests, replies = context.Queue(), context.Queue()
    process = context.Process(target=serve, args=(clients, requests, replies), daemon=True)
    process.start()
    try:
        address = replies.get(timeout=120)
        requests.put("admit")
        before = replies.get(timeout=60)
        result = drive(address, clients, batches, tiny_model())
        requests.put("stats")
        after = replies.get(timeout=60)
    finally:
        requests.put("stop")
        process.join(30)
    return {**result, "server_before": before, "server_after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks/load.md"))
    args = parser.parse_args()
    result = run_load(args.clients, args.batches)
    total = args.clients * args.batches
    lines = [f"Command: `python benchmarks/body_load.py --clients {args.clients} --batches {args.batches}`; "
             f"{cpu_name()}, {os.cpu_count()} CPU cores (server and clients on the same machine; every reply is "
             "checked against the body computed on the client side, which the throughput includes)", "",
             "| clients | exchanges (forward + backward) | answered | errors | seconds | exchanges / s "
             "| server pending after | server peak RSS before → after |", "|---|---|---|---|---|---|---|---|",
             f"| {args.clients} | {total} | {sum(result['answered'])} | {len(result['errors'])} | {result['seconds']:.1f} "
             f"| {result['exchanges_per_s']:.0f} | {result['server_after']['pending']} "
             f"| {result['server_before']['max_rss_mib']:.0f} → {result['server_after']['max_rss_mib']:.0f} MiB |"]
    lines += [f"error: {error}" for error in result["errors"][:10]]
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
