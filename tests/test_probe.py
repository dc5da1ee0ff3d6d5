"""The federated linear probe: its statistics average exactly, its fit is linear discriminant analysis, and
a run sends each sample through the body once, never a label-dependent message, and resumes without
sending again."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.aggregate import fedavg
from sfprompt.client import Client
from sfprompt.codec import Message, decode
from sfprompt.compare import tabulate
from sfprompt.config import ConfigError
from sfprompt.federation import prepare
from sfprompt.probe import ABSENT, STATISTICS, accumulate, feature_statistics, fit_classifier, oas_shrunk
from sfprompt.runner import run
from sfprompt.server import BodyServer
from sfprompt.tracking import Scalars
from sfprompt.meter import Meter
from sfprompt.transport import InProcessLink

from conftest import write_imagefolder
from test_runner import tiny_config


def gaussian_classes(samples: int, width: int = 6, classes: int = 3, draw: int = 0):
    """Classes with their own means and one shared covariance (LDA's model; the same for every `draw` of samples)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(classes, width, generator=g) * 2
    mixing = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    g.manual_seed(1 + draw)
    labels = torch.randint(0, classes, (samples,), generator=g)
    features = means[labels] + torch.randn(samples, width, generator=g) @ mixing.T
    return features, labels, means, mixing @ mixing.T


def test_clients_statistics_averaged_by_fedavg_are_those_of_all_their_samples():
    features, labels, _, _ = gaussian_classes(300)
    # a skewed split: client 0 holds class 0 alone, the others the rest in uneven parts
    order = torch.argsort(labels, stable=True)
    parts = [order[:70], order[70:130], order[130:]]
    each = [feature_statistics(features[p], labels[p], 3) for p in parts]
    averaged = fedavg(each, [len(p) for p in parts])
    whole = feature_statistics(features, labels, 3)
    assert all(torch.allclose(averaged[k], whole[k], atol=1e-5) for k in STATISTICS)
    assert torch.allclose(averaged["class_frequency"], torch.bincount(labels, minlength=3) / 300.0)


def test_the_fit_recovers_the_bayes_classifier_of_shared_covariance_gaussians():
    features, labels, means, covariance = gaussian_classes(200_000)
    weight, bias = fit_classifier(feature_statistics(features, labels, 3), 200_000)
    precision = torch.linalg.inv(covariance)
    true_weight = means @ precision
    # logits are defined up to a shift common to the classes: compare differences to class 0
    assert torch.allclose(weight - weight[0], true_weight - true_weight[0], atol=0.15)  # entries of about 10
    test_features, _, _, _ = gaussian_classes(5000, draw=1)
    predictions = (test_features @ weight.T + bias).argmax(1)
    bayes = (test_features @ true_weight.T - 0.5 * (true_weight * means).sum(1)).argmax(1)
    assert (predictions == bayes).float().mean() > 0.995


def test_the_fit_of_features_sharing_a_large_mean_predicts_in_float32_as_in_float64():
    """The tail's features (a LayerNorm's output: each sample's features sum alike, a direction of no spread) share
    a mean far larger than their spread. The textbook W = M S^-1 amplified it into weights so large that float32
    logits cancelled (about 98 % of these predictions as float64 made them): the fit is made about the features'
    mean, so a mean every sample shares changes neither its weights nor its predictions."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (4000,), generator=g)
    features = (torch.randn(10, 128, generator=g) * 0.03)[labels] + 0.13 * torch.randn(4000, 128, generator=g)
    features = features - features.mean(1, keepdim=True)
    shared = torch.randn(128, generator=g)
    shifted = features + 100 * shared / shared.norm()
    weight, bias = fit_classifier(feature_statistics(shifted, labels, 10), 4000)
    in_float32 = (shifted @ weight.T + bias).argmax(1)
    in_float64 = (shifted.double() @ weight.double().T + bias.double()).argmax(1)
    assert (in_float32 == in_float64).float().mean() >= 0.999
    unshifted, _ = fit_classifier(feature_statistics(features, labels, 10), 4000)
    assert torch.allclose(weight, unshifted, atol=1e-2) and weight.abs().max() < 10


def test_oas_shrinks_a_singular_covariance_into_an_invertible_one_and_leaves_a_well_estimated_one():
    torch.manual_seed(0)
    few = torch.randn(5, 40, dtype=torch.float64)
    singular = few.T @ few / 5  # rank 5 of 40
    shrunk = oas_shrunk(singular, 5)
    assert torch.linalg.eigvalsh(shrunk).min() > 0 and torch.allclose(torch.trace(shrunk), torch.trace(singular))
    many = torch.randn(100_000, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    estimated = many.T @ many / 100_000  # far from a multiple of the identity, and well estimated
    assert torch.allclose(oas_shrunk(estimated, 100_000), estimated, atol=1e-3)
    isotropic = torch.randn(100_000, 4, dtype=torch.float64)
    estimated = isotropic.T @ isotropic / 100_000  # the identity: shrinking towards it is right
    target = torch.trace(estimated) / 4 * torch.eye(4, dtype=torch.float64)
    assert (oas_shrunk(estimated, 100_000) - target).norm() < 0.5 * (estimated - target).norm()


def test_a_class_no_client_has_shown_is_never_predicted():
    features, labels, _, _ = gaussian_classes(300)
    statistics = feature_statistics(features[labels != 2], labels[labels != 2], 3)
    weight, bias = fit_classifier(statistics, int((labels != 2).sum()))
    assert bias[2] == ABSENT and torch.all(weight[2] == 0)
    assert not ((features @ weight.T + bias).argmax(1) == 2).any()


def test_rounds_accumulate_into_the_fit_of_every_sample_reported():
    features, labels, _, _ = gaussian_classes(400)
    parts = [torch.arange(0, 100), torch.arange(100, 250), torch.arange(250, 400)]
    state = {name: torch.zeros_like(value) for name, value in feature_statistics(features, labels, 3).items()}
    state |= {"samples": torch.zeros((), dtype=torch.float64), "tail.head.weight": torch.zeros(3, 6),
              "tail.head.bias": torch.zeros(3)}
    upload = lambda p: {**state, **feature_statistics(features[p], labels[p], 3)}  # noqa: E731
    state = accumulate(state, [upload(parts[0]), upload(parts[1])], [100, 150])
    state = accumulate(state, [upload(parts[2])], [150])
    weight, bias = fit_classifier(feature_statistics(features, labels, 3), 400)
    assert float(state["samples"]) == 400
    assert torch.allclose(state["tail.head.weight"], weight, atol=1e-4) and torch.allclose(state["tail.head.bias"], bias, atol=1e-4)


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_probe_run_sends_each_sample_through_the_body_once(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, method="linear-probe", clients=3, clients_per_round=2, rounds=4)
    run(config, progress=False, log=lambda _: None)
    history = records(tmp_path / "run")
    fed = prepare(config)
    first_sampled = {}
    for record in history:
        for cid in record["clients"]:
            first_sampled.setdefault(cid, record["round"])
    batches = lambda n: -(-n // config.batch_size)  # noqa: E731
    for record in history:
        new = [cid for cid, r in first_sampled.items() if r == record["round"]]
        sent = sum(batches(fed.clients[cid].num_examples) for cid in new)
        assert record["messages_by_phase"].get("up/probe", 0) == sent
        assert record["messages_by_phase"].get("down/probe", 0) == sent
        assert "up/split" not in record["bytes_by_phase"] and "down/split" not in record["bytes_by_phase"]
        assert (record["server_flops"] > 0) == bool(new)
    assert all(record["train_loss"] is None for record in history)
    # the statistics stay on the server: a broadcast is the prompts (none) and the tail
    tail_bytes = sum(t.numel() * t.element_size() for t in fed.model.new_params().tail.state_dict().values())
    assert all(0 < record["bytes_by_phase"]["down/broadcast"] < len(record["clients"]) * (tail_bytes + 2000)
               for record in history)


def test_a_probe_round_asks_probe_clients_and_the_later_rounds_draw_as_without_them(imagefolder, tmp_path):
    clients = {}
    for asked in (2, 4):
        config = tiny_config(imagefolder, tmp_path / str(asked), clients=5, clients_per_round=2, rounds=3,
                             probe_rounds=1, refit_rounds=0, probe_clients=asked)
        run(config, progress=False, log=lambda _: None)
        clients[asked] = [record["clients"] for record in records(tmp_path / str(asked) / "run")]
    assert len(set(clients[4][0])) == len(clients[4][0]) == 4 and set(clients[2][0]) < set(clients[4][0])
    assert clients[4][1:] == clients[2][1:]  # the rounds after the probe round sample the same clients
    with pytest.raises(ConfigError, match="--probe-clients must be between --clients-per-round"):
        tiny_config(imagefolder, tmp_path, clients=4, clients_per_round=2, probe_rounds=1, probe_clients=5)
    with pytest.raises(ConfigError, match="--probe-clients must be between --clients-per-round"):
        tiny_config(imagefolder, tmp_path, clients=4, clients_per_round=2, probe_rounds=1, probe_clients=1)
    with pytest.raises(ConfigError, match="this run has none"):  # nothing it would change: refused, not ignored
        tiny_config(imagefolder, tmp_path, method="linear-probe", clients=4, clients_per_round=2, probe_clients=4)


def ambiguous_folder(tmp_path):
    """Classes k and k + 4 look alike in gray: the probe cannot fit them all, so split training moves the prompts
    and the tail's norms (on the easy default folder the probe's fit leaves them no loss to descend)."""
    return write_imagefolder(tmp_path / "ambiguous", classes=8, train_per_class=4, test_per_class=2, gray=True)


def central_fit(fed, prompts, tail_state):
    """The closed-form classifier on every training sample's features, taken with `prompts` and the tail norms of
    `tail_state` (a global state's `tail.*`)."""
    with torch.no_grad():
        images = torch.stack([image for image, _ in fed.train])
        labels = torch.tensor([label for _, label in fed.train])
        tail = fed.model.new_params().tail
        tail.load_state_dict({name.removeprefix("tail."): t for name, t in tail_state.items()
                              if name.startswith("tail.")})
        rows = fed.model.body(fed.model.head(images, prompts))[:, fed.model.layout.tail_rows]
        return fit_classifier(feature_statistics(tail.features(rows), labels, fed.model.num_classes), len(labels))[0]


def test_a_refit_round_closes_the_run_with_the_fit_on_the_trained_prompts_features(tmp_path):
    config = tiny_config(ambiguous_folder(tmp_path), tmp_path, method="sfprompt", clients=3, clients_per_round=2,
                         rounds=3, probe_rounds=1, refit_rounds=1, prompt_lr=0.01,  # the same prompts with none
                         wire_dtype="float32")  # unrounded features
    run(config.replace(rounds=2, refit_rounds=0, out=str(tmp_path / "before")), progress=False, log=lambda _: None)
    run(config, progress=False, log=lambda _: None)
    history = records(tmp_path / "run")
    assert [r["stage"] for r in history] == ["linear-probe", "sfprompt", "linear-probe"]
    assert len(history[2]["clients"]) == 3 and "up/probe" in history[2]["bytes_by_phase"]  # every client, again
    before, after = (load_file(tmp_path / folder / "global.safetensors") for folder in ("before", "run"))
    assert torch.equal(before["prompts"], after["prompts"])  # the refit moves the classifier alone
    fed = prepare(config)
    refit = central_fit(fed, after["prompts"], after)  # every client's features with the trained prompts and norms
    cached = central_fit(fed, fed.model.new_params().prompts, after)  # had the probe round's features been reused
    close = dict(rtol=1e-3, atol=1e-3 * float(refit.abs().max()))
    assert torch.allclose(after["tail.head.weight"], refit, **close)
    assert not torch.allclose(after["tail.head.weight"], cached, **close)
    for changes, message in (({"refit_rounds": 2}, "leave none of the --rounds"), ({"refit_rounds": -1}, "0 or more"),
                             ({"method": "fl", "probe_rounds": 0}, "--refit-rounds closes a run of a split method"),
                             ({"upload_epsilon": 1.0, "upload_clip": 1.0, "probe_rounds": 0}, "--refit-rounds 0")):
        with pytest.raises(ConfigError, match=message):
            config.replace(**changes)
    assert (config.replace(rounds=2, probe_rounds=None).probe_rounds,  # the default's probe round leaves it room
            config.replace(rounds=3, probe_rounds=None).probe_rounds) == (0, 1)


def test_a_refit_round_takes_features_again_when_split_training_moved_the_tail_norms_alone(tmp_path):
    config = tiny_config(ambiguous_folder(tmp_path), tmp_path, method="sfl", prompt_tokens=0, clients=3,
                         clients_per_round=2, rounds=3, probe_rounds=1, refit_rounds=1)
    run(config, progress=False, log=lambda _: None)
    history = records(tmp_path / "run")
    assert "up/probe" in history[2]["bytes_by_phase"]  # no prompts, yet the norms the features pass through moved


def test_the_audit_without_a_run_plays_the_opening_probe_rounds_alone(tmp_path):
    from sfprompt.inprocess import InProcessRuntime
    from sfprompt.runner import play_rounds

    for probe_rounds, played in ((0, []), (1, ["round 1 (linear-probe) played"])):
        fed = prepare(tiny_config(ambiguous_folder(tmp_path / str(probe_rounds)), tmp_path, method="sfl", rounds=4,
                                  probe_rounds=probe_rounds, refit_rounds=1))
        lines = []
        play_rounds(fed, InProcessRuntime(fed, progress=False), lines.append)
        assert [line.split(":")[0] for line in lines] == played  # not the split rounds before the refit round


def test_the_probe_of_every_client_at_once_is_the_central_fit_on_the_same_samples(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, method="linear-probe", clients=3, clients_per_round=3, rounds=1,
                         wire_dtype="float32")  # the features as the body computes them (int8 rounds them)
    run(config, progress=False, log=lambda _: None)
    fed = prepare(config)
    model, tail = fed.model, fed.method.new_params(fed.model).tail
    with torch.no_grad():
        images = torch.stack([image for image, _ in fed.train])
        labels = torch.tensor([label for _, label in fed.train])
        features = tail.features(model.body(model.head(images, model.initial_params.prompts[:, :0]))[:, model.layout.tail_rows])
    weight, bias = fit_classifier(feature_statistics(features, labels, model.num_classes), len(labels))
    saved = load_file(tmp_path / "run" / "global.safetensors")
    # equal to float32 rounding of the statistics, which the solve amplifies (weights of hundreds here)
    for name, expected in (("tail.head.weight", weight), ("tail.head.bias", bias)):
        assert torch.allclose(saved[name], expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    assert float(saved["samples"]) == len(labels)


class _Tap(InProcessLink):
    def __init__(self, *args):
        super().__init__(*args)
        self.sent: list[bytes] = []

    def deliver(self, payload, direction, phase, memory=None):
        if phase == "probe" and direction == "up":
            self.sent.append(payload)
        return super().deliver(payload, direction, phase, memory)


def _probe_messages(fed, labels_of):
    """Every features message client 0 sends, with its labels replaced by `labels_of(labels)`."""
    from sfprompt.inprocess import client_round

    client = fed.clients[0]
    client.data.dataset = _Relabelled(client.data.dataset, labels_of)
    link = _Tap(BodyServer(fed.model, Meter(), fed.device), Meter(), fed.device)
    client_round(link, client, fed.method, fed.method.new_params(fed.model), seed=1)
    return link.sent


class _Relabelled(torch.utils.data.Dataset):
    def __init__(self, data, labels_of):
        self.data, self.labels_of = data, labels_of

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return image, self.labels_of(label)


def test_no_probe_message_depends_on_the_labels(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, method="linear-probe", clients=2, clients_per_round=2)
    true = _probe_messages(prepare(config), lambda label: label)
    permuted = _probe_messages(prepare(config), lambda label: (label + 1) % 3)
    assert true and len(true) == len(permuted)
    for a, b in zip(true, permuted):  # the same bytes but the session's random secret in the header
        a, b = decode(a), decode(b)
        assert a.kind == b.kind == "features" and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_resumed_probe_run_sends_nothing_again_and_ends_as_an_uninterrupted_one(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, method="linear-probe", clients=3, clients_per_round=2, rounds=3)
    run(config.replace(out=str(tmp_path / "whole")), progress=False, log=lambda _: None)
    run(config.replace(out=str(tmp_path / "cut"), rounds=2), progress=False, log=lambda _: None)
    run(config.replace(out=str(tmp_path / "cut")), progress=False, log=lambda _: None, resume=True)
    whole, cut = records(tmp_path / "whole"), records(tmp_path / "cut")
    assert [r["bytes_by_phase"] for r in whole] == [r["bytes_by_phase"] for r in cut]
    assert [r["accuracy"] for r in whole] == [r["accuracy"] for r in cut]
    a, b = load_file(tmp_path / "whole" / "global.safetensors"), load_file(tmp_path / "cut" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_features_request_leaves_nothing_pending_and_is_answered_like_a_forward(imagefolder, tmp_path):
    fed = prepare(tiny_config(imagefolder, tmp_path, method="linear-probe"))
    server = BodyServer(fed.model, Meter(), fed.device)
    tokens = fed.model.send(torch.randn(3, 3, 32, 32), fed.model.initial_params.prompts, None)
    replies = {}
    for kind in ("features", "forward"):
        session = server.admit(kind)
        replies[kind] = server.handle(Message(kind, fed.model.messages.pack_tokens(tokens), {"client": kind, "session": session,
                                                                                     "seq": 1}))
    assert server.pending == 1  # the forward's, awaiting its backward
    assert torch.equal(replies["features"].tensors["rows"], replies["forward"].tensors["rows"])
    assert server.passes == {"features": 1, "forward": 1}


def test_probe_rounds_open_a_prompt_method_and_its_rounds_start_from_the_fitted_tail(imagefolder, tmp_path, monkeypatch):
    config = tiny_config(imagefolder, tmp_path, method="sfprompt", clients=3, clients_per_round=2, rounds=3,
                         probe_rounds=1, refit_rounds=0, wire_dtype="float32")  # compared with a central fit on unrounded features
    received = []
    original = Client.run_round

    def spy(self, method, state, *args):
        received.append((method.name, dict(state.tensors)))
        return original(self, method, state, *args)

    monkeypatch.setattr(Client, "run_round", spy)
    run(config, progress=False, log=lambda _: None)
    history = records(tmp_path / "run")
    assert [r["stage"] for r in history] == ["linear-probe", "sfprompt", "sfprompt"]
    assert "up/probe" in history[0]["bytes_by_phase"] and "up/split" not in history[0]["bytes_by_phase"]
    assert "up/probe" not in history[1]["bytes_by_phase"] and "up/split" in history[1]["bytes_by_phase"]
    assert len(history[0]["clients"]) == 3  # the probe round asks every client
    probe_state, first_own = received[0][1], received[3]
    assert first_own[0] == "sfprompt" and "class_sums" not in first_own[1]
    assert torch.equal(first_own[1]["prompts"], probe_state["prompts"])  # the initial prompts, as the probe took them
    fed = prepare(config)
    with torch.no_grad():  # the tail round 2 starts from is the probe's fit on every client's samples
        images = torch.stack([image for cid in history[0]["clients"] for image, _ in fed.clients[cid].data])
        labels = torch.tensor([label for cid in history[0]["clients"] for _, label in fed.clients[cid].data])
        tail = fed.model.new_params().tail
        rows = fed.model.body(fed.model.head(images, fed.model.initial_params.prompts))[:, fed.model.layout.tail_rows]
        weight, _ = fit_classifier(feature_statistics(tail.features(rows), labels, 3), len(labels))
    assert torch.allclose(first_own[1]["tail.head.weight"], weight, rtol=1e-3, atol=1e-3 * float(weight.abs().max()))


def test_a_run_resumed_across_its_probe_rounds_ends_as_an_uninterrupted_one(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, method="sfl", clients=3, clients_per_round=2, rounds=3, probe_rounds=1)
    run(config.replace(out=str(tmp_path / "whole")), progress=False, log=lambda _: None)
    run(config.replace(out=str(tmp_path / "cut"), rounds=2), progress=False, log=lambda _: None)
    run(config.replace(out=str(tmp_path / "cut")), progress=False, log=lambda _: None, resume=True)
    assert [r["accuracy"] for r in records(tmp_path / "whole")] == [r["accuracy"] for r in records(tmp_path / "cut")]
    a, b = load_file(tmp_path / "whole" / "global.safetensors"), load_file(tmp_path / "cut" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stopped_in_its_probe_rounds_predicts_with_the_probe(imagefolder, tmp_path, monkeypatch):
    from sfprompt.predict import load_run
    from sfprompt.runner import RoundFailed

    config = tiny_config(imagefolder, tmp_path, method="sfprompt", rounds=2, probe_rounds=1)
    monkeypatch.setattr(Client, "split_train", lambda *args: 1 / 0)  # round 2 fails: the run stops after the probe
    with pytest.raises(RoundFailed):
        run(config, progress=False, log=lambda _: None)
    model = load_run(tmp_path / "run")
    assert model.method.name == "linear-probe" and model.round == 1
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_a_run_saved_before_probe_rounds_existed_resumes_without_them(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, rounds=1)
    run(config, progress=False, log=lambda _: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["probe_rounds"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    from sfprompt.config import Config

    assert Config.from_saved(saved).probe_rounds == 0


@pytest.mark.parametrize("changes, message", [
    ({"method": "fl", "probe_rounds": 1}, "split method with a frozen body"),
    ({"method": "sfl", "train_body": True, "probe_rounds": 1}, "train-body"),
    ({"method": "linear-probe", "probe_rounds": 1}, "linear-probe is nothing else"),
    ({"probe_rounds": 2, "rounds": 2}, "leave none"),
    ({"method": "linear-probe", "label_epsilon": 1.0}, "sends none"),
])
def test_probe_options_that_cannot_work_are_refused(changes, message):
    from sfprompt.config import Config, ConfigError

    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def test_the_default_recipe_opens_and_closes_with_a_probe_round_of_every_client(tmp_path):
    config = tiny_config(ambiguous_folder(tmp_path), tmp_path, method="sfprompt", clients=3, clients_per_round=2,
                         rounds=3, probe_rounds=None)  # the defaults, as `sfprompt run` takes them
    assert (config.probe_rounds, config.refit_rounds, config.lr, config.prompt_lr) == (1, 1, 3e-4, 0.01)
    lines = []
    run(config, progress=False, log=lines.append)
    rounds = [line for line in lines if line.startswith("round ")]
    assert ["the refit rounds fit it" in line for line in rounds] == [False, True, False]  # a stale tail, said
    history = records(tmp_path / "run")
    assert [r["stage"] for r in history] == ["linear-probe", "sfprompt", "linear-probe"]
    assert [len(r["clients"]) for r in history] == [3, 2, 3]  # the probe rounds ask every client
    assert ["up/probe" in r["bytes_by_phase"] for r in history] == [True, False, True]  # the prompts moved: sent again
    assert [r["stale_tail"] for r in history] == [False, True, False]  # recorded, so that a reader can tell
    assert [h["stale_tail"] for h in tabulate("run", tmp_path / "run", None)["history"]] == [False, True, False]
    older = tmp_path / "older"  # the same run's records as written before the field: read from its config
    older.mkdir()
    (older / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
    (older / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "stale_tail"}) + "\n"
                                                 for r in history))
    assert [h["stale_tail"] for h in tabulate("older", older, None)["history"]] == [False, True, False]
    shown = [sorted(tag for tag in Scalars([])(r) if tag.startswith(("accuracy", "loss/test"))) for r in history]
    assert shown[1] == ["accuracy/test_stale_tail", "loss/test_stale_tail"] and shown[0] == shown[2] == ["accuracy/test", "loss/test"]
