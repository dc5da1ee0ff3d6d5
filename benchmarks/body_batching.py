"""Body throughput with many concurrent clients: one request at a time against the batching body server,
and both against one centralised batch of the same samples through the same body.

N client threads each run split-training exchanges (a forward of BATCH samples, then its backward)
against one `BodyServer`, as a network channel's threads would (the codec and the sockets are left
out: benchmarks/runtime.py measures those). Throughput is body samples a second, forward and backward
both; the centralised reference runs N x BATCH samples through the body's forward and backward in one
call, with no server around it. Each --precision is measured the same way (its speed-up is the ratio
of its rows to fp32's). The batched server's passes through the body per exchange (forward and
backward, warm-up included) say how many batches a phase took: 2 when one batch held every client,
more when a forward batch stopped at --batch-samples. A configuration that runs out of device memory
is reported as such. With --repeats, each mode is measured that many times, interleaved with the
others (a busy machine then slows each alike), and the median is reported. A second table gives one
centralised batch's samples a second at each of --batch-sizes: the measurement the server's default
cap on a forward batch (`server.BATCH_SAMPLES`) follows.

    python benchmarks/body_batching.py                      # ViT-S/14 at 56 px on this machine's CPU
    python benchmarks/body_batching.py --model vit_base_patch16_224 --image-size 224 \
        --precision fp32 bf16 fp16 --device cuda            # the GPU figures in docs/benchmarks/index.md

It prints a Markdown report and writes it to docs/benchmarks/batching-<device type>.md, which
docs/benchmarks/index.md includes.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from sfprompt.codec import Message
from sfprompt.meter import Meter
from sfprompt.model import SplitViT, create_vit
from sfprompt.server import BATCH_SAMPLES, MAX_BATCH, BodyServer
from write_benchmarks import cpu_name, publish


def split_model(name: str, image_size: int, precision: str, device: torch.device) -> SplitViT:
    torch.manual_seed(0)  # random weights: throughput does not depend on them
    vit = create_vit(name, num_classes=10, image_size=image_size, weights="none")
    model = SplitViT(vit, prompt_tokens=10, client_blocks=0, seed=0, precision=precision)
    model.body.to(device)
    return model


def tail_rows(model: SplitViT) -> int:
    return len(range(model.layout.length)[model.layout.tail_rows])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def centralised(model: SplitViT, samples: int, steps: int, device: torch.device) -> float:
    """Samples a second of one batch through the body's forward and backward, no server around it."""
    tokens = torch.randn(samples, model.layout.length, model.layout.width, device=device)
    grad = torch.randn(samples, tail_rows(model), model.layout.width, device=device)

    def step() -> None:
        leaf = tokens.detach().requires_grad_(True)
        model.body(leaf)[:, model.layout.tail_rows].backward(grad)

    return _timed(step, samples, steps, device)


def served(model: SplitViT, clients: int, batch: int, steps: int, window_s: float | None,
           device: torch.device, batch_samples: int | None = None) -> tuple[float, float]:
    """Samples a second of `clients` concurrent clients, each running `steps` exchanges of `batch` samples,
    and the server's passes through the body per exchange."""
    server = BodyServer(model, Meter(), device, batch_window_s=window_s, batch_samples=batch_samples)
    sessions = [server.admit(str(k)) for k in range(clients)]
    tokens = [torch.randn(batch, model.layout.length, model.layout.width, device=device) for _ in range(clients)]
    grads = [torch.randn(batch, tail_rows(model), model.layout.width, device=device) for _ in range(clients)]
    sequence = [0] * clients
    errors: list[BaseException] = []

    def exchange(k: int) -> None:
        for kind, name, tensor in (("forward", "tokens", tokens[k]), ("backward", "grad", grads[k])):
            sequence[k] += 1
            server.handle(Message(kind, {name: tensor}, {"client": str(k), "session": sessions[k], "seq": sequence[k]}))

    def client(k: int, count: int) -> None:
        try:
            for _ in range(count):
                exchange(k)
        except BaseException as err:  # noqa: BLE001 - reported by the caller (out of memory, say)
            errors.append(err)

    def round_of(count: int) -> None:
        threads = [threading.Thread(target=client, args=(k, count)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    try:
        rate = _timed(lambda: round_of(steps), clients * batch * steps, 1, device, warm_up=lambda: round_of(1))
    finally:
        server.close()
    return rate, sum(server.passes.values()) / (steps + 1)


def _timed(step, samples_per_step: int, steps: int, device: torch.device, warm_up=None) -> float:
    (warm_up or step)()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return samples_per_step * steps / (time.perf_counter() - started)


def measure(what, device: torch.device, values: int = 1) -> tuple:
    """The tuple of `values` values `what` returns, or "out of memory" standing for each when the device runs out."""
    try:
        return what()
    except torch.OutOfMemoryError:
        return ("out of memory",) * values
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--batch-size", type=int, default=32, help="each client's samples a request")
    parser.add_argument("--steps", type=int, default=5, help="exchanges each client runs, after one to warm up")
    parser.add_argument("--window-s", type=float, default=0.01, help="the batching server's window")
    parser.add_argument("--batch-samples", type=int, help="the batching server's cap on a forward batch "
                        "(default: the device's, server.BATCH_SAMPLES)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each mode, interleaved; the median")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[],
                        help="centralised batch sizes to time the body at (a second table)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.repeats < 1 or (args.batch_samples is not None and args.batch_samples < 1):
        parser.error("--repeats and --batch-samples are at least 1")
    device = torch.device(args.device)
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (fp32 matrix products in full fp32, no TF32)"
    else:
        machine = f"{cpu_name()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    cap = args.batch_samples or BATCH_SAMPLES.get(device.type, MAX_BATCH)
    lines = [f"Command: `python benchmarks/body_batching.py --model {args.model} --image-size {args.image_size} "
             f"--clients {' '.join(map(str, args.clients))} --batch-size {args.batch_size} --steps {args.steps} "
             f"--window-s {args.window_s}" + (f" --batch-samples {args.batch_samples}" if args.batch_samples else "")
             + (f" --repeats {args.repeats}" if args.repeats > 1 else "")
             + (f" --batch-sizes {' '.join(map(str, args.batch_sizes))}" if args.batch_sizes else "")
             + f" --precision {' '.join(args.precision)} --device {args.device}`; {machine}. "
             "Body samples a second (forward and backward) with N concurrent clients of "
             f"{args.batch_size} samples: one request at a time (the default), batched (`body-batching`, window "
             f"{args.window_s * 1000:g} ms, forward batches of at most {cap:,} samples), and one "
             f"centralised batch of N x {args.batch_size} samples through the same body with no server around it"
             + (f"; each the median of {args.repeats} measurements, interleaved" if args.repeats > 1 else "") + ".", "",
             "| precision | clients | one at a time | batched | centralised batch | batched / centralised "
             "| batched / one at a time | body passes an exchange, batched |", "|---|---|---|---|---|---|---|---|"]
    sizes = ["", "One centralised batch through the body (forward and backward), samples a second by batch size:", "",
             "| precision | " + " | ".join(map(str, args.batch_sizes)) + " |", "|---|" + "---|" * len(args.batch_sizes)]
    for precision in args.precision:
        model = split_model(args.model, args.image_size, precision, device)
        for clients in args.clients:
            modes = {"central": lambda: (centralised(model, clients * args.batch_size, args.steps, device), 0),
                     "alone": lambda: served(model, clients, args.batch_size, args.steps, None, device),
                     "batched": lambda: served(model, clients, args.batch_size, args.steps, args.window_s, device,
                                               args.batch_samples)}
            got = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode, what in modes.items():
                    got[mode].append(measure(what, device, values=2))
            (central, _), (alone, _), (batched, passes) = (_median(got[mode]) for mode in modes)
            cells = [_rate(v) for v in (alone, batched, central)]
            ratios = [_ratio(batched, central), _ratio(batched, alone)]
            lines.append(f"| {precision} | {clients} | " + " | ".join(cells + ratios) + f" | {_rate(passes, '.1f')} |")
            print(lines[-1], flush=True)
        if args.batch_sizes:
            rates = [_median([measure(lambda: (centralised(model, size, args.steps, device),), device)
                              for _ in range(args.repeats)])[0] for size in args.batch_sizes]
            sizes.append(f"| {precision} | " + " | ".join(_rate(rate) for rate in rates) + " |")
            print(sizes[-1], flush=True)
    lines += sizes if args.batch_sizes else []
    publish(lines, args.markdown or Path(f"docs/benchmarks/batching-{device.type}.md"))


def _median(values: list[tuple]):
    """The median measurement by its first value (the upper of the middle two for an even count), or the failure
    if any measurement failed (out of memory)."""
    failures = [v for v in values if isinstance(v[0], str)]
    return failures[0] if failures else sorted(values, key=lambda v: v[0])[len(values) // 2]


def _rate(value: float | str, form: str = ",.0f") -> str:
    return value if isinstance(value, str) else format(value, form)


def _ratio(a: float | str, b: float | str) -> str:
    return "—" if isinstance(a, str) or isinstance(b, str) else f"{a / b:.2f}×"


if __name__ == "__main__":
    main()
