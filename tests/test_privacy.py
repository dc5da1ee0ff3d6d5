"""What a client sends in a full SFPrompt round: exactly the list in docs/guarantees.md ("What
leaves a client"), never an input or a label."""

import pytest
import torch

from sfprompt.client import Client
from sfprompt.codec import decode
from sfprompt.meter import UP
from sfprompt.federation import prepare
from sfprompt.runner import run
from sfprompt.transport import InProcessLink

from test_runner import tiny_config

SPLIT_META = {"client", "session", "seq"}
UPLOAD_META = {"client", "num_examples", "train_loss", "local_loss", "kept"}


@pytest.mark.parametrize("client_blocks", [0, 1])
def test_a_client_sends_only_activations_of_kept_samples_gradients_prompts_and_tail(imagefolder, tmp_path, monkeypatch,
                                                                                     client_blocks):
    config = tiny_config(imagefolder, tmp_path, rounds=1, clients=3, clients_per_round=3, client_blocks=client_blocks,
                         wire_dtype="float32", shared_rows="per-sample")  # the paper's format: one tensor a request
    sent, seen_images, seen_labels = [], [], []
    deliver, loader = InProcessLink.deliver, Client._loader

    def recording_deliver(self, payload, direction, phase, memory=None):
        if direction == UP:  # every payload a client puts on the network (uploads and split requests), as sent
            sent.append(decode(payload))
        return deliver(self, payload, direction, phase, memory)

    def recording_loader(self, data, ctx, shuffle=True):
        for batch in loader(self, data, ctx, shuffle):
            seen_images.append(batch[0])
            seen_labels.append(batch[1])
            yield batch

    monkeypatch.setattr(InProcessLink, "deliver", recording_deliver)
    monkeypatch.setattr(Client, "_loader", recording_loader)
    run(config, progress=False, log=lambda _: None)

    kinds = [m.kind for m in sent]
    assert set(kinds) == {"forward", "backward", "done", "update"} and kinds.count("update") == kinds.count("done") == 3
    forwards = [m for m in sent if m.kind == "forward"]
    updates = [m for m in sent if m.kind == "update"]
    for message in sent:
        assert set(message.meta) == (UPLOAD_META if message.kind == "update" else SPLIT_META)
        assert all(isinstance(v, (int, float, str, type(None))) for v in message.meta.values())  # no lists: no labels
        for tensor in message.tensors.values():
            assert tensor.is_floating_point()  # labels are integers; none is ever sent
            assert tensor.dim() != 4  # no image batch (B, C, H, W)
            for images in seen_images:  # and no input is hidden in another shape
                assert tensor.numel() != images.numel() or not torch.equal(tensor.flatten().cpu(), images.flatten().cpu())
    # split requests: the head's activations (B, L, D) and the gradient of the rows the tail read
    layout = prepare(config).model.layout
    assert all(set(m.tensors) == {"tokens"} and m.tensors["tokens"].shape[1:] == (layout.length, layout.width)
               for m in forwards)
    assert all(set(m.tensors) == {"grad"} for m in sent if m.kind == "backward")
    # activations of the kept samples only: kept x split epochs rows in total
    kept = sum(u.meta["kept"] for u in updates)
    assert sum(len(m.tensors["tokens"]) for m in forwards) == kept * config.split_epochs
    # uploads: exactly the prompts and the tail
    expected = set(prepare(config).model.new_params().state_dict())
    assert expected == {"prompts"} | {k for k in expected if k.startswith("tail.")}
    assert all(set(update.tensors) == expected for update in updates)


def _sent_by_client_0(config, relabel):
    """Every request client 0 puts on the network in one round of `config` (its kind and tensors), with each of
    its labels replaced by `relabel(label)` (the images unchanged)."""
    from sfprompt.inprocess import client_round
    from sfprompt.meter import Meter
    from sfprompt.server import BodyServer

    fed = prepare(config)
    client = fed.clients[0]
    data = client.data.dataset

    class Relabelled(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, index):
            image, label = data[index]
            return image, relabel(label)

    client.data.dataset = Relabelled()
    sent = []

    class Tap(InProcessLink):
        def deliver(self, payload, direction, phase, memory=None):
            if direction == UP and phase != "upload":
                sent.append(decode(payload))
            return super().deliver(payload, direction, phase, memory)

    link = Tap(BodyServer(fed.model, Meter(), fed.device), Meter(), fed.device)
    client_round(link, client, fed.method, fed.method.new_params(fed.model), seed=1)
    return [(m.kind, m.tensors) for m in sent]


def _same(a, b):
    return len(a) == len(b) and all(ka == kb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
                                    for (ka, ta), (kb, tb) in zip(a, b))


def test_permuting_the_labels_leaves_every_probe_message_unchanged(imagefolder, tmp_path):
    config = tiny_config(imagefolder, tmp_path, method="linear-probe", rounds=1, clients=2, clients_per_round=2)
    true, permuted = (_sent_by_client_0(config, relabel) for relabel in (lambda y: y, lambda y: (y + 1) % 3))
    assert true and {kind for kind, _ in true} == {"features", "done"} and _same(true, permuted)


@pytest.mark.parametrize("method, changes", [("sfl", {}), ("sfprompt", {"keep_ratio": 1.0, "local_epochs": 0})])
def test_in_split_training_the_labels_reach_every_backward_and_the_prompt_rows_of_later_forwards(
        imagefolder, tmp_path, method, changes):
    """Without client blocks a forward's image rows never depend on a label, but the prompts step on gradients of
    the labels, so the prompt rows of every forward after the first carry them, as every backward does."""
    config = tiny_config(imagefolder, tmp_path, method=method, rounds=1, clients=2, clients_per_round=2,
                         wire_dtype="float32", shared_rows="per-sample", **changes)  # every row of every sample sent
    true, permuted = (_sent_by_client_0(config, relabel) for relabel in (lambda y: y, lambda y: (y + 1) % 3))
    forwards = lambda sent: [tensors["tokens"] for kind, tensors in sent if kind == "forward"]  # noqa: E731
    backwards = lambda sent: [tensors["grad"] for kind, tensors in sent if kind == "backward"]  # noqa: E731
    layout = prepare(config).model.layout
    (first, *later), (first_p, *later_p) = forwards(true), forwards(permuted)
    assert later and torch.equal(first, first_p)
    assert all(torch.equal(a[:, layout.patch_rows], b[:, layout.patch_rows]) for a, b in zip(later, later_p))
    assert all(not torch.equal(a[:, layout.prompt_rows], b[:, layout.prompt_rows]) for a, b in zip(later, later_p))
    assert all(not torch.equal(a, b) for a, b in zip(backwards(true), backwards(permuted)))


def test_forward_only_sends_no_gradient_but_its_prompt_steps_carry_the_labels(imagefolder, tmp_path):
    """With --prompt-updates forward-only no message is a gradient and the image rows never depend on a label;
    the prompts still step by loss differences the labels shape, so every prompt set after the first batch's
    carries them (what the audit is to measure)."""
    config = tiny_config(imagefolder, tmp_path, method="sfl", rounds=1, clients=2, clients_per_round=2,
                         prompt_updates="forward-only", directions=2)
    true, permuted = (_sent_by_client_0(config, relabel) for relabel in (lambda y: y, lambda y: (y + 1) % 3))
    assert {kind for kind, _ in true} == {"evaluate", "done"}
    (first, *later), (first_p, *later_p) = ([tensors for kind, tensors in sent if kind == "evaluate"] for sent in (true, permuted))
    assert later and all(torch.equal(first[k], first_p[k]) for k in first)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(later, later_p))
    assert all(not torch.equal(a["shared"], b["shared"]) for a, b in zip(later, later_p))


def test_pruning_chooses_the_samples_sent_by_their_labels(imagefolder, tmp_path):
    """SFPrompt's pruning ranks samples by a loss on their labels: which images are sent depends on the labels."""
    config = tiny_config(imagefolder, tmp_path, rounds=1, clients=2, clients_per_round=2, keep_ratio=0.5,
                         prune_per_class=False, local_epochs=1)
    true, permuted = (_sent_by_client_0(config, relabel) for relabel in (lambda y: y, lambda y: (y + 1) % 3))
    forwards = lambda sent: [m for m in sent if m[0] == "forward"]  # noqa: E731
    assert not _same(forwards(true), forwards(permuted))
