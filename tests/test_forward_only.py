"""--prompt-updates forward-only: the zeroth-order estimate, the `evaluate` request the body server answers
without ever running a backward, the options that cannot combine with it, and a run that trains with it."""

import itertools
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from sfprompt import zeroth_order
from sfprompt.cli import main
from sfprompt.codec import Message, ProtocolError
from sfprompt.config import Config, ConfigError
from sfprompt.federation import prepare
from sfprompt.meter import Meter
from sfprompt.model import SplitViT, create_vit
from sfprompt.runner import run
from sfprompt.server import BodyServer
from sfprompt.wire import WireFormat
from sfprompt.zeroth_order import Perturbations

from conftest import ROOT, run_benchmark, run_python_benchmark
from test_runner import tiny_config


@pytest.mark.parametrize("estimator, tolerance", [("antithetic", 0.02), ("one-sided", 0.05)])
def test_the_estimate_recovers_the_gradient_of_a_smooth_loss(estimator, tolerance):
    """On a quadratic loss the estimate's mean over many directions is the gradient (antithetic: exactly
    in expectation; one-sided: up to the perturbation's curvature term)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=generator), torch.randn(2, 6, generator=generator)
    loss = lambda p: ((p @ a - b) ** 2).sum()  # noqa: E731
    prompts = torch.randn(2, 6, generator=generator)
    true = 2 * (prompts @ a - b) @ a.T
    directions = torch.randn(200_000, 2, 6, generator=generator, dtype=torch.float64).float()
    sets = zeroth_order.prompt_sets(prompts, directions, 1e-3, estimator)
    assert sets.shape == (1 + directions.shape[0] * (2 if estimator == "antithetic" else 1), 2, 6)
    assert torch.equal(sets[0], prompts)
    estimate = zeroth_order.gradient(torch.stack([loss(p) for p in sets]), directions, 1e-3, estimator)
    assert float((estimate - true).norm() / true.norm()) < tolerance


def test_the_residual_estimate_recovers_the_gradient_from_one_set_a_step():
    """Residual feedback: one set a step, p + eps z_t, its loss set against the previous step's (here the same
    prompts and loss, every step's direction fresh): the previous direction's term is independent of z_t, so the
    mean is the gradient, with the variance of two one-sided estimates."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=generator), torch.randn(2, 6, generator=generator)
    loss = lambda p: ((p @ a - b) ** 2).sum(dim=(-2, -1))  # noqa: E731
    prompts = torch.randn(2, 6, generator=generator)
    true = 2 * (prompts @ a - b) @ a.T
    directions = torch.randn(200_001, 2, 6, generator=generator, dtype=torch.float64).float()
    one_set = zeroth_order.prompt_sets(prompts, directions[:1], 1e-3, "residual")
    assert torch.equal(one_set, prompts + 1e-3 * directions[:1])
    losses = loss(prompts + 1e-3 * directions)  # (T,): each step's one set
    estimate = zeroth_order.gradient(losses[1:], directions[1:], 1e-3, "residual", previous=losses[:-1])
    assert float((estimate - true).norm() / true.norm()) < 0.08
    assert Perturbations(directions=1, size=1e-2, estimator="residual").sets == 1


ONE_DIRECTION = Perturbations(directions=1, size=0.1, estimator="antithetic")  # 3 prompt sets


def split_with(perturbations: Perturbations | None = ONE_DIRECTION, shared_once: bool = True) -> SplitViT:
    torch.manual_seed(0)
    vit = create_vit("test_vit", num_classes=4, image_size=32, weights="none")
    return SplitViT(vit, 3, 0, 0, wire=WireFormat(shared_once=shared_once), perturbations=perturbations)


def evaluate(split: SplitViT, images: torch.Tensor, seed: int, meta: dict) -> tuple[Message, torch.Tensor]:
    """An evaluate of `images` under the split's initial prompts, as a client sends it, and its prompt sets."""
    prompts = split.new_params().prompts.detach()
    directions = split.perturbations.draw(seed, prompts.shape[1:])
    tokens = split.send(images, prompts, None)
    message = Message("evaluate", split.messages.pack_tokens(tokens), meta | split.messages.evaluate_meta(seed, directions))
    return message, split.perturbations.sets_of(prompts[0], directions)


def test_an_evaluate_gives_each_prompt_sets_rows_as_its_own_forward_would_and_keeps_nothing():
    split = split_with()
    server = BodyServer(split, Meter(), torch.device("cpu"))
    meta = {"client": "0", "session": server.admit("0"), "seq": 1}
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    message, sets = evaluate(split, images, seed=7, meta=meta)
    assert set(message.tensors) == {"tokens", "shared"}  # a forward's tensors: the directions travel as a seed
    with torch.no_grad():
        reply = server.handle(message)
        rows = split.messages.unpack_rows(reply.tensors, 3 * len(images)).view(3, len(images), -1, split.layout.width)
        for got, p in zip(rows, sets):
            alone = split.body(split.send(images, p[None], None))[:, split.layout.tail_rows]
            assert torch.allclose(got, alone, atol=1e-5)
    assert not torch.equal(rows[1], rows[2])  # the perturbed sets differ
    assert server.pending == 0 and server.passes["backward"] == 0
    with pytest.raises(ProtocolError):  # nothing awaits a gradient
        server.handle(Message("backward", {"grad": rows[0]}, meta | {"seq": 2}))


@pytest.mark.parametrize("change, match", [
    ({"directions-seed": -1}, "integer seed"), ({"directions-seed": 2**31}, "integer seed"),
    ({"directions-seed": "7"}, "integer seed"), ({"directions-seed": True}, "integer seed"),
    ({"directions-sum": 0.5}, "same torch"),
])
def test_the_server_refuses_an_evaluate_whose_seed_is_bad_or_names_other_directions(change, match):
    split = split_with()
    server = BodyServer(split, Meter(), torch.device("cpu"))
    message, _ = evaluate(split, torch.randn(2, 3, 32, 32), seed=7, meta={"client": "0", "session": server.admit("0"), "seq": 1})
    with pytest.raises(ProtocolError, match=match):
        server.handle(Message("evaluate", message.tensors, message.meta | change))


def test_a_run_without_forward_only_refuses_evaluates():
    for split in (split_with(None), split_with(shared_once=False)):
        server = BodyServer(split, Meter(), torch.device("cpu"))
        message, _ = evaluate(split_with(), torch.randn(2, 3, 32, 32), seed=7,
                              meta={"client": "0", "session": server.admit("0"), "seq": 1})
        with pytest.raises(ProtocolError, match="sends no evaluates"):
            server.handle(message)


@pytest.mark.parametrize("changes, match", [
    (dict(method="fl-prompt"), "split method"), (dict(method="sfl", train_body=True), "frozen body"),
    (dict(prompt_tokens=0), "needs prompts"), (dict(client_blocks=1), "needs --estimator residual"),
    ({"client_budgets": "1,2"}, "needs --estimator residual"),
    (dict(shared_rows="per-sample"), "--shared-rows once"),
    (dict(directions=0), "--directions"), (dict(perturbation=0.0), "--perturbation"),
    (dict(estimator="two-point"), "--estimator must be one of"), (dict(precision="bf16"), "rounds"),
    (dict(wire_dtype="int8"), "rounds"), (dict(estimator="residual", directions=2), "--directions 1"),
])
def test_options_that_cannot_go_with_forward_only_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        Config(**({"prompt_updates": "forward-only"} | changes))


def test_with_client_blocks_only_the_residual_estimator_is_taken():
    """Its one set a batch is one forward through the client's blocks, whatever the shared rows (with blocks no
    row is shared)."""
    for changes in ({"client_blocks": 1}, {"client_blocks": 1, "shared_rows": "per-sample"},
                    {"client_budgets": "1,2"}):
        Config(prompt_updates="forward-only", estimator="residual", **changes)
    with pytest.raises(ConfigError, match="--shared-rows once"):  # a budget may leave a head with no blocks
        Config(prompt_updates="forward-only", estimator="residual", client_budgets="1,2", shared_rows="per-sample")


def test_a_head_with_blocks_sends_its_one_perturbed_set_and_no_seed():
    """With client blocks the client perturbs its prompts before its blocks: the evaluate carries that set's tokens
    and no seed, the server answers with their rows as a forward without a graph, and keeps nothing; an evaluate
    that names directions, or one from a run whose estimator takes more than one set, is refused."""
    torch.manual_seed(0)
    vit = create_vit("test_vit", num_classes=4, image_size=32, weights="none")
    split = SplitViT(vit, 3, 1, 0, perturbations=Perturbations(1, 0.1, "residual"))
    server = BodyServer(split, Meter(), torch.device("cpu"))
    meta = {"client": "0", "session": server.admit("0"), "seq": 1}
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = split.new_params().prompts.detach()
    directions = split.perturbations.draw(7, prompts.shape[1:])
    sent = split.messages.sent_prompts(prompts, directions)
    assert torch.allclose(sent, prompts + 0.1 * directions)  # perturbed on the client
    assert split.messages.evaluate_meta(7, directions) == {}  # the directions stay there
    tokens = split.send(images, sent, None)
    with torch.no_grad():
        reply = server.handle(Message("evaluate", split.messages.pack_tokens(tokens), meta))
        rows = split.messages.unpack_rows(reply.tensors, len(images))
        assert torch.allclose(rows, split.body(tokens)[:, split.layout.tail_rows], atol=1e-5)
    assert server.pending == 0 and server.passes["backward"] == 0
    with pytest.raises(ProtocolError, match="names no directions"):
        server.handle(Message("evaluate", split.messages.pack_tokens(tokens),
                              meta | {"seq": 2, "directions-seed": 7, "directions-sum": zeroth_order.checksum(directions)}))
    antithetic = SplitViT(vit, 3, 1, 0, perturbations=Perturbations(1, 0.1, "antithetic"))
    server = BodyServer(antithetic, Meter(), torch.device("cpu"))
    with pytest.raises(ProtocolError, match="sends no evaluates"):
        server.handle(Message("evaluate", split.messages.pack_tokens(tokens), meta | {"session": server.admit("0")}))


def test_the_tails_step_computes_the_rows_gradient_only_where_it_is_sent():
    """Backprop sends the gradient of the rows the tail read (at the shown labels, under label DP); a forward-only
    step sends none, so it does not compute it: the tail's own gradient is the same either way."""
    from sfprompt.client import Client

    torch.manual_seed(0)
    tail = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(tail.parameters(), lr=0.1)
    rows, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    steps = {}
    for name, shown in (("backprop", labels), ("label DP", torch.tensor([1, 1, 2, 0])), ("forward-only", None)):
        given = rows.clone()
        loss, sent = Client._tail_step(tail, given, labels, shown, optimizer)
        steps[name] = (loss.item(), [p.grad.clone() for p in tail.parameters()], sent, given.requires_grad)
    assert steps["forward-only"][2] is None and not steps["forward-only"][3]  # no gradient of the rows asked for
    assert steps["backprop"][2].shape == rows.shape and steps["backprop"][3]
    assert not torch.equal(steps["label DP"][2], steps["backprop"][2])  # taken at the shown labels
    for name in ("label DP", "forward-only"):  # the tail always learns from the true labels
        assert steps[name][0] == steps["backprop"][0]
        assert all(torch.equal(a, b) for a, b in zip(steps[name][1], steps["backprop"][1]))


def test_prompt_sets_follow_the_estimator():
    assert Config().perturbations is None
    assert Config(prompt_updates="forward-only", directions=3).perturbations.sets == 7
    assert Config(prompt_updates="forward-only", directions=3, estimator="one-sided").perturbations.sets == 4


@pytest.mark.parametrize("method", ["sfprompt", "sfl"])
def test_a_forward_only_run_moves_the_prompts_with_one_request_a_batch(imagefolder, tmp_path, method):
    quiet = dict(progress=False, log=lambda _: None)
    config = tiny_config(imagefolder, tmp_path, method=method, rounds=1, prompt_updates="forward-only", directions=2,
                         perturbation=1e-2, keep_ratio=1.0)
    run(config, **quiet)
    run(tiny_config(imagefolder, tmp_path, method=method, rounds=1, keep_ratio=1.0, out=str(tmp_path / "backprop")), **quiet)
    trained = load_file(str(tmp_path / "run" / "global.safetensors"))["prompts"]
    assert not torch.equal(trained, prepare(config).model.new_params().prompts.detach())  # moved, no gradient sent
    forward_only, backprop = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                              for name in ("run", "backprop"))
    # one request and one reply a batch, where backprop sends a forward and a backward
    assert forward_only[0]["messages_by_phase"]["up/split"] * 2 == backprop[0]["messages_by_phase"]["up/split"]


def test_a_residual_run_sends_one_set_a_batch_and_costs_the_client_no_more_than_backprop(imagefolder, tmp_path):
    """The residual estimator evaluates only the set the tail trains on: one set's rows down a batch (the one-sided
    estimator's two; backprop's one, and the prompts' gradient) and, counted, exactly backprop's client FLOPs,
    where the one-sided step's extra set costs the tail's forward on it. Its prompts move from a round's second
    step on."""
    quiet = dict(progress=False, log=lambda _: None)
    records = {}
    for name, changes in (("backprop", {}), ("one-sided", dict(prompt_updates="forward-only", estimator="one-sided")),
                          ("residual", dict(prompt_updates="forward-only", estimator="residual"))):
        config = tiny_config(imagefolder, tmp_path, rounds=1, keep_ratio=1.0, perturbation=1e-2,
                             out=str(tmp_path / name), **changes)
        run(config, **quiet)
        records[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    trained = load_file(str(tmp_path / "residual" / "global.safetensors"))["prompts"]
    assert not torch.equal(trained, prepare(config).model.new_params().prompts.detach())
    down = {name: r["bytes_by_phase"]["down/split"] for name, r in records.items()}
    assert down["residual"] < down["backprop"] < down["one-sided"]
    flops = {name: r["client_flops"] for name, r in records.items()}
    assert flops["residual"] == flops["backprop"] < flops["one-sided"]
    assert records["residual"]["server_flops"] < records["backprop"]["server_flops"]  # one forward a batch, no backward


def test_with_client_blocks_a_residual_run_costs_the_client_less_than_backprop(imagefolder, tmp_path):
    """The goal with client blocks: below backprop's client FLOPs. A residual step runs the client's blocks forward
    once, without a graph, where backprop runs them forward and backward; no gradient crosses the link either way
    down (backprop's reply carries every row's), and the body runs one forward a batch and no backward."""
    quiet = {"progress": False, "log": lambda _: None}
    records = {}
    for name, changes in (("backprop", {}), ("residual", {"prompt_updates": "forward-only", "estimator": "residual"})):
        config = tiny_config(imagefolder, tmp_path, rounds=1, keep_ratio=1.0, perturbation=1e-2, client_blocks=1,
                             out=str(tmp_path / name), **changes)
        run(config, **quiet)
        records[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    phase = {name: r["flops_by_phase"] for name, r in records.items()}
    assert phase["residual"]["client/local"] == phase["backprop"]["client/local"]  # the local loss: backprop alike
    assert phase["residual"]["client/split"] < 0.7 * phase["backprop"]["client/split"]
    assert records["residual"]["server_flops"] < 0.6 * records["backprop"]["server_flops"]
    down = {name: r["bytes_by_phase"]["down/split"] for name, r in records.items()}
    assert down["residual"] < 0.2 * down["backprop"]
    assert records["residual"]["messages_by_phase"]["up/split"] * 2 == records["backprop"]["messages_by_phase"]["up/split"]


def test_with_client_blocks_each_step_moves_the_prompts_along_the_direction_they_were_sent_with(imagefolder, tmp_path,
                                                                                                monkeypatch):
    """The client perturbs its prompts itself before its blocks: under SGD without momentum each residual step moves
    them along the direction of its send, (sent - prompts) / eps, by the loss difference (a round's first step
    moves nothing; sfl: no local phase moves them between sends)."""
    from sfprompt.client import Client

    sends, slopes = [], []
    head_tokens, gradient = Client._head_tokens, zeroth_order.gradient

    def noted(self, ctx, images, prompts):
        if ctx.phase == "split":
            sends.append((prompts.detach().clone(), ctx.params.prompts.detach().clone()))
        return head_tokens(self, ctx, images, prompts)

    def noted_gradient(losses, directions, perturbation, estimator, previous=None):
        slopes.append(float((losses - previous) / perturbation))
        return gradient(losses, directions, perturbation, estimator, previous)

    monkeypatch.setattr(Client, "_head_tokens", noted)
    monkeypatch.setattr(zeroth_order, "gradient", noted_gradient)
    config = tiny_config(imagefolder, tmp_path, method="sfl", rounds=1, clients_per_round=1, keep_ratio=1.0,
                         client_blocks=1, prompt_updates="forward-only", estimator="residual", perturbation=1e-2,
                         optimizer="sgd", momentum=0.0, weight_decay=0.0, prompt_lr=0.1)
    run(config, progress=False, log=lambda _: None)
    assert len(sends) >= 4
    moves = [after - before for (_, before), (_, after) in itertools.pairwise(sends)]
    directions = [(sent - prompts) / 1e-2 for sent, prompts in sends]
    assert float(directions[0].std()) == pytest.approx(1.0, abs=0.2)  # standard normal, drawn anew each step
    assert torch.equal(moves[0], torch.zeros_like(moves[0])) and len(slopes) == len(sends) - 1
    for move, z, slope in zip(moves[1:], directions[1:], slopes):  # SGD: -lr (L_t - L_(t-1)) / eps z_t
        assert torch.allclose(move, -0.1 * slope * z, rtol=1e-3, atol=1e-6)


def test_the_estimate_quality_benchmark_tables_every_estimator_size_and_direction_count(tmp_path):
    done = run_python_benchmark("zo_quality.py", "--options", "--model test_vit --weights none --image-size 32 "
                                "--train-samples 60 --test-samples 20", "--out", str(tmp_path), "--doc",
                                str(tmp_path / "zo.md"), "--batches", "2", "--directions", "1", "2",
                                "--perturbations", "0.01")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["estimator"], r["directions"]) for r in rows} == \
        {(e, k) for e in ("antithetic", "one-sided") for k in (1, 2)} | {("residual", 1)}  # residual: K = 1 alone
    assert {r["estimator"]: r["batches"] for r in rows} == {"antithetic": 2, "one-sided": 2, "residual": 1}
    assert all(-1 <= r["cosine"] <= 1 and r["exact_cosine"] > 0 for r in rows)
    assert (tmp_path / "zo.md").read_text().count("\n| ") == 1 + len(rows)  # the header and a line a row


def test_the_servers_sample_limit_counts_an_evaluates_images():
    """max_batch bounds a request's images, not its images times its prompt sets: 3 sets of 4 images pass a limit of
    4, 5 images do not."""
    split = split_with()
    server = BodyServer(split, Meter(), torch.device("cpu"), max_batch=4)
    session = server.admit("0")
    for seq, images in enumerate((4, 5), start=1):
        message, _ = evaluate(split, torch.randn(images, 3, 32, 32), seed=seq, meta={"client": "0", "session": session, "seq": seq})
        if images == 4:
            assert len(server.handle(message).tensors["rows"]) == 12
        else:
            with pytest.raises(ProtocolError, match="5 images; at most 4"):
                server.handle(message)


def test_the_forward_only_benchmark_runs_each_row_and_writes_its_report(tmp_path):
    doc = tmp_path / "forward-only.md"
    common = {"SEEDS": "0", "SETTINGS": "iid", "DOC": str(doc), "COST_DIRECTIONS": "1 2", "COST_SAMPLES": "200"}
    done = run_benchmark("forward_only.sh", tmp_path, ROWS="backprop forward-only-2 backprop-client-blocks-1 "
                         "forward-only-1-residual-client-blocks-1", **common)
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `bash benchmarks/forward_only.sh`") and "### iid" in text
    text, per_k = text.split("### One client's round at each K")
    costs = {}
    for line in per_k.splitlines():
        if line.startswith(("| backprop", "| forward")):
            name, *cells = line.strip("| ").split(" | ")
            costs[name] = [float(cell.replace(",", "").removesuffix(" %")) for cell in cells]
    assert list(costs) == ["backprop", "forward-only, K = 1", "forward-only, K = 2", "forward-only, K = 1, one-sided",
                           "forward-only, K = 1, residual", "backprop, 1 client block",
                           "forward-only, K = 1, residual, 1 client block"]
    blocked = costs["forward-only, K = 1, residual, 1 client block"]  # against backprop with a client block
    assert blocked[6] < 0 and blocked[2] < 1 and blocked[4] < 1 and costs["backprop, 1 client block"][6] == 0
    # each direction adds two sets of rows down and two forwards on the server (one-sided: one); the forward up is
    # the same
    one_sided, k1, k2 = costs["forward-only, K = 1, one-sided"], costs["forward-only, K = 1"], costs["forward-only, K = 2"]
    residual = costs["forward-only, K = 1, residual"]
    assert residual[3] < one_sided[3] < k1[3] < k2[3] and costs["backprop"][3] < k1[3]
    assert residual[2] < one_sided[2] < k1[2] < k2[2]  # bytes over backprop's
    assert one_sided[0] == k1[0] == k2[0]
    # the client's FLOPs over backprop's: the tail's loss under each prompt set beyond the one it trains on
    assert 0 < one_sided[6] < k1[6] < k2[6]
    assert k1[6] == pytest.approx(2 * one_sided[6], rel=0.05)
    assert residual[6] == 0  # no set beyond the one the tail trains on
    grid, against = text.split("### iid against backprop\n")
    against, against_blocked = against.split("### iid against backprop-client-blocks-1")
    assert [line.split(" | ")[0] for line in grid.splitlines() if line.startswith("| ") and "seed" not in line
            and not line.startswith("|---")] == ["| backprop", "| forward-only-2", "| backprop-client-blocks-1",
                                                  "| forward-only-1-residual-client-blocks-1"]
    assert [line.split(" | ")[:2] for line in against.splitlines() if line.startswith("| forward")] == \
        [["| forward-only-2", "1"]] * 3  # the final accuracies, then at equal bytes and at equal server FLOPs
    assert [line.split(" | ")[:2] for line in against_blocked.splitlines() if line.startswith("| forward")] == \
        [["| forward-only-1-residual-client-blocks-1", "1"]] * 3  # each against backprop at its own split point
    runs = tmp_path / "runs" / "iid"
    config = json.loads((runs / "forward-only-2" / "seed-0" / "config.json").read_text())
    assert (config["prompt_updates"], config["directions"], config["prompt_tokens"]) == ("forward-only", 2, 50)
    sent = [json.loads((runs / row / "seed-0" / "metrics.jsonl").read_text().splitlines()[-1])["messages_by_phase"]["up/split"]
            for row in ("backprop", "forward-only-2")]
    assert sent[1] * 2 == sent[0]  # one evaluate a batch where backprop sends a forward and a backward
    # backprop is recipe.sh's default-prompts-50 row (the same options): its runs are made once, there
    assert (runs / "backprop").is_symlink()
    assert (tmp_path / "recipe" / "default-iid" / "default-prompts-50" / "seed-0" / "summary.json").is_file()
    table_only = run_benchmark("forward_only.sh", tmp_path, TABLE_ONLY="1",
                               ROWS="backprop forward-only-2 forward-only-1 forward-only-1-one-sided", **common)
    assert table_only.returncode == 0, table_only.stderr[-3000:]
    assert not (runs / "forward-only-1").exists()  # no run made: the table of those there are
    assert "no seed to pair in forward-only-1, forward-only-1-one-sided." in doc.read_text()
    assert "| forward-only-2 | 0 |" in doc.read_text()
    def expanded(row):
        return subprocess.run(["bash", "-c", f"source benchmarks/lib.sh && forward_only_options {row}"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert expanded("forward-only-1-one-sided") == ["--prompt-updates", "forward-only", "--directions", "1",
                                                    "--estimator", "one-sided", "--perturbation", "0.01"]
    assert expanded("forward-only-1-residual") == ["--prompt-updates", "forward-only", "--directions", "1",
                                                   "--estimator", "residual", "--perturbation", "0.01"]
    # a row's estimate is written out, so that the row keeps its meaning if the defaults move
    assert expanded("forward-only-2") == ["--prompt-updates", "forward-only", "--directions", "2",
                                          "--estimator", "antithetic", "--perturbation", "0.001"]
    misspelt = run_benchmark("forward_only.sh", tmp_path, ROWS="linear-probe forward-olny-1", **common)
    assert misspelt.returncode != 0 and "unknown row forward-olny-1" in misspelt.stderr
    assert not (runs / "linear-probe").is_symlink()  # refused before the recipe's row was linked (or made)
    assert not (tmp_path / "recipe" / "default-iid" / "linear-probe").exists()


def test_the_equal_cost_table_pairs_seeds_and_reads_each_run_within_the_smaller_total(tmp_path):
    """benchmarks/equal_cost_table.py on made-up runs: seeds both rows finished, costs' ratios, and each run read
    after its last evaluated round within the smaller total that was not read through a stale tail."""
    def runs(row: str, rounds_by_seed: dict[int, list[tuple[float | None, float, float, bool]]]) -> None:
        for seed, rounds in rounds_by_seed.items():  # each round: accuracy, MB, server GFLOP, stale tail
            run = tmp_path / row / f"seed-{seed}"
            run.mkdir(parents=True)
            records = [{"round": n, "accuracy": acc, "bytes_up": mb * 1e6, "bytes_down": 0, "client_flops": 0,
                        "server_flops": gflop * 1e9, "stale_tail": stale}
                       for n, (acc, mb, gflop, stale) in enumerate(rounds, start=1)]
            (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
            (run / "summary.json").write_text(json.dumps({"final_accuracy": rounds[-1][0], "rounds": len(rounds)}))

    runs("backprop", {1: [(0.90, 100, 10, False), (0.50, 50, 30, True), (0.95, 100, 10, False)],
                      2: [(0.92, 100, 10, False), (0.40, 50, 30, True), (0.97, 100, 10, False)]})
    runs("forward-only", {0: [(0.99, 100, 10, False)],  # no backprop run of seed 0 to pair it with
                          1: [(0.91, 100, 10, False), (0.60, 30, 90, True), (0.93, 100, 10, False)],
                          2: [(0.93, 100, 10, False), (0.70, 30, 90, True), (0.95, 100, 10, False)]})
    runs("skipping", {1: [(None, 60, 5, False), (0.80, 60, 5, False), (0.85, 60, 5, False)],  # --eval-every 2
                      2: [(0.70, 60, 5, False), (0.30, 10, 5, True), (0.80, 10, 5, False), (0.88, 60, 5, False)]})
    runs("dear", {1: [(0.90, 300, 5, False)], 2: [(0.90, 100, 5, False), (0.95, 200, 5, False)]})
    runs("stale", {seed: [(0.90, 10, 10, False), (0.20, 10, 10, True), (0.95, 400, 10, False)] for seed in (1, 2)})
    done = run_python_benchmark("equal_cost_table.py", *(str(tmp_path / row) for row in (
        "backprop", "forward-only", "skipping", "dear", "stale", "none")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "; no seed to pair in none." in done.stdout
    tables = [[line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
              for table in done.stdout.split("\n\n") if table.startswith("| run")]
    final, at_bytes, at_flops = ({row.split(" | ")[0].removeprefix("| "): row for row in table} for table in tables)
    assert final["forward-only"] == "| forward-only | 2 | -2.0 ± 0.0 | 0.92 ± 0.00 | 2.20 ± 0.00 |"
    # at forward-only's 230 MB, backprop's last round (250 MB) is out and its second is stale: its probe round
    assert at_bytes["forward-only"] == "| forward-only | 2 | 230 ± 0 | 0.940 ± 0.014 (3) | 0.910 ± 0.014 (1) | +3.0 ± 0.0 |"
    # at backprop's 50 server GFLOP, forward-only's second round (100 in all) is out: its probe round
    assert at_flops["forward-only"] == "| forward-only | 2 | 50 ± 0 | 0.920 ± 0.014 (1) | 0.960 ± 0.014 (3) | -4.0 ± 0.0 |"
    # each seed read at its own end (round 1 of seed 1 was not evaluated), backprop within that after its round 1
    assert at_bytes["skipping"] == "| skipping | 2 | 160 ± 28 | 0.865 ± 0.021 (3/4) | 0.910 ± 0.014 (1) | -4.5 ± 0.7 |"
    assert at_bytes["dear"] == "| dear | 2 | 250 ± 0 | — | 0.960 ± 0.014 (3) | — |"  # seed 1's one round is dearer
    assert at_bytes["stale"] == "| stale | 2 | 250 ± 0 | 0.900 ± 0.000 (1) | 0.960 ± 0.014 (3) | -6.0 ± 1.4 |"
    alone = run_python_benchmark("equal_cost_table.py", str(tmp_path / "forward-only"))
    assert alone.returncode != 0 and "usage" in alone.stderr


@pytest.mark.slow
def test_the_forward_only_rate_grid_runs_each_rate_on_validation_and_writes_its_table(tmp_path):
    doc = tmp_path / "forward-only-tuning.md"
    done = run_benchmark("forward_only.sh", tmp_path, TUNE="1", TUNE_RATES="0.001", TUNE_DOC=str(doc),
                         SIZE="--train-samples 40 --test-samples 20 --clients 2 --clients-per-round 2 --rounds 3 "
                              "--image-size 28 --validation-samples 10")  # a probe, a split and a refit round
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `TUNE=1 bash benchmarks/forward_only.sh`")
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "seed" not in line
            and not line.startswith("|---")] == ["| prompt-lr-0.001"]
    config = json.loads((tmp_path / "runs" / "tune" / "prompt-lr-0.001" / "seed-0" / "config.json").read_text())
    assert (config["prompt_updates"], config["directions"], config["prompt_lr"], config["validation_samples"],
            config["refit_rounds"]) == ("forward-only", 4, 0.001, 10, 1)


def test_the_forward_only_audit_benchmark_attacks_each_row_and_writes_its_table(tmp_path):
    doc = tmp_path / "forward-only-audit.md"
    done = run_benchmark("forward_only_audit.sh", tmp_path, SEEDS="0", ROWS="forward-only-2-label-epsilon-1",
                         DOC=str(doc), UPLOADS="aggregated",
                         SIZE="--train-samples 48 --test-samples 20 --clients 6 --clients-per-round 3 "
                              "--rounds 3 --image-size 28")  # the default recipe: a probe round, one split, a refit
    assert done.returncode == 0, done.stderr[-3000:]
    assert doc.read_text().startswith("Command: `UPLOADS=aggregated bash benchmarks/forward_only_audit.sh`")
    header, _, row = [line.split(" | ") for line in doc.read_text().splitlines() if line.startswith("|")]
    row = dict(zip(header, row))
    assert row["| row"] == "| forward-only-2-label-epsilon-1" and row["seeds"] == "1"
    assert row["trajectory, each step's tail"] and row["one step: trajectory |"] and not row["gradient attack"]
    assert row["the upload alone"]  # what the tail it uploaded would have named without secure aggregation
    # the model it broadcast, read on the victim's images: a second guess, the one the advantage is counted against
    assert row["broadcast model's guess"] and row["trajectory from the broadcast model's guess"]
    assert row["best attack - best label-free"] and "broadcast model's columns" in doc.read_text().split("|")[0]
    audit = json.loads((tmp_path / "runs" / "forward-only-2-label-epsilon-1" / "seed-0" / "audit.json").read_text())
    assert audit["audit"]["uploads"] == "aggregated"
    config = audit["config"]
    assert (config["prompt_updates"], config["directions"], config["label_epsilon"], config["prompt_tokens"]) == (
        "forward-only", 2, 1.0, 50)
    # today's recipe: a probe round of every client, a refit round to close, so the prompts at their own rate
    assert (config["probe_rounds"], config["probe_clients"], config["refit_rounds"], config["prompt_lr"]) == (1, 6, 1, 0.01)
    assert audit["labels"]["steps_read"] >= 1
    mixed = run_benchmark("forward_only_audit.sh", tmp_path, SEEDS="0", ROWS="forward-only-2-label-epsilon-1",
                          DOC=str(tmp_path / "seen.md"))  # the same folder, read as a server that sees each upload
    assert mixed.returncode != 0 and "audited with --uploads aggregated, not seen" in mixed.stderr
    assert not (tmp_path / "seen.md").exists()  # no table that mixes the two readings


def test_the_forward_only_audit_benchmark_attacks_whole_runs_with_sends_run(tmp_path):
    """SENDS=run replays forward_only.sh's runs (RUNS), each attacked at the client its split rounds sampled most."""
    doc, runs = tmp_path / "forward-only-audit-run.md", tmp_path / "forward-only" / "iid"
    whole = {"SENDS": "run", "UPLOADS": "aggregated", "SEEDS": "0", "ROWS": "forward-only-2", "RUNS": str(runs),
             "DOC": str(doc), "SIZE": ""}
    missing = run_benchmark("forward_only_audit.sh", tmp_path, **whole)
    assert missing.returncode == 2 and not doc.exists()
    assert "no finished run" in missing.stderr
    assert "SETTINGS=iid SEEDS=0 bash benchmarks/forward_only.sh" in missing.stderr
    run = runs / "forward-only-2" / "seed-0"
    assert main(["run", "--train-samples", "40", "--test-samples", "20", "--clients", "5", "--clients-per-round", "2",
                 "--rounds", "4", "--image-size", "28", "--prompt-tokens", "50", "--prompt-updates", "forward-only",
                 "--directions", "2", "--seed", "0", "--out", str(run), "--no-progress"]) == 0
    sized = run_benchmark("forward_only_audit.sh", tmp_path, **(whole | {"SIZE": "--rounds 2"}))
    assert sized.returncode == 2 and "SIZE is for one round's audits" in sized.stderr

    (run / "global.safetensors").unlink()  # kept without its weights, as the benchmarks' runs are
    done = run_benchmark("forward_only_audit.sh", tmp_path, **whole)
    assert done.returncode == 0, done.stderr[-3000:]
    audit = json.loads((tmp_path / "runs" / "forward-only-2" / "seed-0" / "audit.json").read_text())
    assert (audit["audit"]["sends"], audit["audit"]["uploads"], audit["params"]) == ("run", "aggregated", str(run))
    assert audit["replay"] == "same metrics"  # checked round by round against its metrics.jsonl
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    split = [r["clients"] for r in rounds if r["stage"] == "sfprompt"]  # rounds 2 and 3, between probe and refit
    assert len(split) == 2 and len(rounds) == 4
    victim = audit["audit"]["victim"]
    assert victim == min(range(5), key=lambda c: (-sum(c in clients for clients in split), c))  # lowest id of a tie
    assert audit["labels"]["steps_read"] >= 2 and not (run / "audit.json").exists()  # the run's folder untouched
    text = doc.read_text()
    assert text.startswith("Command: `UPLOADS=aggregated SENDS=run bash benchmarks/forward_only_audit.sh`")
    assert f"(seed 0: client {victim})" in text and "read the newest tail it broadcast to it" in text
    # the final model the run ends with: a second label-free guess, and a second prior for the trajectory
    assert {"final_model", "trajectory_final_prior", "best_label_free"} <= set(audit["labels"])
    assert ("| final model's guess | trajectory from the final model's guess | trajectory, replayed tails "
            "| best attack - best label-free |") in text
    other = run_benchmark("forward_only_audit.sh", tmp_path, **(whole | {"RUNS": str(tmp_path / "other")}))
    assert other.returncode == 2 and "is not an audit of" in other.stderr  # not passed off as another run's
    mixed = run_benchmark("forward_only_audit.sh", tmp_path, SEEDS="0", ROWS="forward-only-2", UPLOADS="aggregated",
                          DOC=str(tmp_path / "round.md"))  # the same folder, read as one round's
    assert mixed.returncode != 0 and "audited with --sends run, not round" in mixed.stderr
    assert not (tmp_path / "round.md").exists()
