"""What a client sends in a full SFPrompt round: exactly the README's list (Failures, bad input and privacy:
what is guaranteed), never an input or a label."""

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
    config = tiny_config(imagefolder, tmp_path, rounds=1, clients=3, clients_per_round=3, client_blocks=client_blocks)
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
    assert set(kinds) == {"forward", "backward", "update"} and kinds.count("update") == 3
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
