"""What a client's own process holds (`federation.prepare_client`): its own samples, from a folder of
its own or its seeded partition, and in the split methods only the head's and tail's weights. A node
with its own folder gives the very run the in-process runtime gives on the same samples."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfprompt.config import ConfigError
from sfprompt.data import ClientFolder, count_images
from sfprompt.federation import prepare, prepare_client
from sfprompt.flower.server_app import FlowerRuntime
from sfprompt.flower.settings import FlowerOptions
from sfprompt.runner import run

from test_flower_inline import InlineGrid, _inflated, records, run_inline
from test_flower_inline import flower_task_identity, node_disks  # noqa: F401 (fixtures)
from conftest import client_folders
from test_runner import tiny_config


def test_a_split_client_holds_the_head_and_tail_only_and_needs_no_body_weights(imagefolder, tmp_path, weights_file):
    config = tiny_config(imagefolder, tmp_path, weights=str(weights_file), client_blocks=1)
    fed = prepare(config)
    head_only = {k: v for k, v in load_file(weights_file).items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}
    assert len(head_only) < len(load_file(weights_file))
    save_file(head_only, str(tmp_path / "head.safetensors"))
    side = prepare_client(config.replace(weights=str(tmp_path / "head.safetensors")), 1, fed.data.classes)
    assert side.model.body is None and len(side.model.head.blocks) == 1
    assert all(t.device.type == "cpu" for t in side.model._vit.state_dict().values())  # nothing left on meta
    held = sum(t.numel() for t in side.model._vit.state_dict().values())
    assert held < sum(t.numel() for t in fed.model._vit.state_dict().values()) / 2
    images = torch.stack([fed.clients[1].data[k][0] for k in range(4)])
    prompts = fed.model.initial_params.prompts
    assert torch.equal(side.model.send(images, prompts, None), fed.model.send(images, prompts, None))
    shared, own = fed.model.initial_params.state_dict(), side.model.initial_params.state_dict()
    assert all(torch.equal(shared[k], own[k]) for k in shared)
    own_samples = [side.data[int(k)] for k in side.indices]  # its seeded partition, as prepare draws it
    assert [label for _, label in own_samples] == [fed.clients[1].data[k][1] for k in range(len(own_samples))]
    assert torch.equal(own_samples[0][0], fed.clients[1].data[0][0])


def test_a_weights_file_without_the_head_is_refused_in_one_line(imagefolder, tmp_path, weights_file):
    config = tiny_config(imagefolder, tmp_path, weights=str(weights_file))
    classes = prepare(config).data.classes
    save_file({k: v for k, v in load_file(weights_file).items() if not k.startswith("patch_embed")},
              str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConfigError, match="missing.*patch_embed"):
        prepare_client(config.replace(weights=str(tmp_path / "broken.safetensors")), 0, classes)


def test_a_client_folder_names_classes_by_name_or_index_and_refuses_others(tmp_path):
    from PIL import Image

    for sub, name in (("cat", "0002.png"), ("1", "0001.png"), ("cat", "0003.png")):
        (tmp_path / "own" / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "own" / sub / name)
    folder = ClientFolder(tmp_path / "own", ["dog", "bird", "cat"])
    assert folder.targets == [1, 2, 2] and count_images(tmp_path / "own") == 3  # file-name order across classes
    (tmp_path / "own" / "horse").mkdir()
    with pytest.raises(ConfigError, match=r"\['horse'\] are not classes"):
        ClientFolder(tmp_path / "own", ["dog", "bird", "cat"])
    with pytest.raises(ConfigError, match="does not exist"):
        ClientFolder(tmp_path / "nowhere", ["dog"])


def test_nodes_with_their_own_folders_give_the_in_process_run_on_the_same_samples(imagefolder, tmp_path, weights_file):
    config = tiny_config(imagefolder, tmp_path, weights=str(weights_file), clients=3, clients_per_round=2, rounds=2)
    folders = client_folders(prepare(config), tmp_path / "nodes")
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lambda _: None)
    grid = InlineGrid(3)
    for k, folder in enumerate(folders):
        grid.contexts[100 + k].node_config["data-folder"] = str(folder)
    grid.contexts[100].node_config["data-dir"] = str(tmp_path / "no-dataset-here")  # a node needs only its folder
    run_inline(config.replace(out=str(tmp_path / "flower")), grid)
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local)
    a, b = records(tmp_path / "local"), records(tmp_path / "flower")
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert [r["bytes_up"] + r["bytes_down"] for r in a] == [r["bytes_up"] + r["bytes_down"] for r in b]


def test_a_folder_node_weighs_at_most_what_it_reported_or_the_configured_cap(imagefolder, tmp_path, monkeypatch,
                                                                            weights_file):
    from sfprompt.flower import client_app

    config = tiny_config(imagefolder, tmp_path, weights=str(weights_file), clients=3, clients_per_round=3, rounds=1)
    fed = prepare(config)
    folders = client_folders(fed, tmp_path / "nodes")
    grid = InlineGrid(3)
    for k, folder in enumerate(folders):
        grid.contexts[100 + k].node_config["data-folder"] = str(folder)
    train = client_app.train

    def inflating(msg, context):
        reply = train(msg, context)
        if context.node_config["partition-id"] == 1:
            _inflated(reply)
        return reply

    monkeypatch.setattr(client_app, "train", inflating)
    run_inline(config, grid)
    (dropped,) = records(tmp_path / "run")[0]["dropped"]
    sizes = [c.num_examples for c in fed.clients]
    assert dropped["client"] == 1 and f"more than its cap of {sizes[1]}" in dropped["reason"]
    runtime = FlowerRuntime(fed, grid, {k: 100 + k for k in range(3)}, FlowerOptions(max_examples=3), {1: sizes[1]})
    try:
        assert runtime.caps == {0: sizes[0], 1: 3, 2: sizes[2]}  # partitions: their size; a folder: capped
    finally:
        runtime.close()


def test_export_clients_writes_each_partition_once_and_overwrites_nothing(imagefolder, tmp_path, capsys):
    from sfprompt.cli import main

    fed = prepare(tiny_config(imagefolder, tmp_path, clients=3))
    flags = ["--dataset", "imagefolder", "--data-dir", str(imagefolder), "--clients", "3", "--out", str(tmp_path / "nodes"),
             "--no-progress"]
    assert main(["export-clients", *flags]) == 0
    assert "wrote 3 client folders" in capsys.readouterr().out
    for client in fed.clients:
        folder = ClientFolder(tmp_path / "nodes" / f"client-{client.cid}", fed.data.classes)
        assert folder.targets == [fed.data.train_labels[fed.train.indices[p]] for p in client.data.indices]
    assert main(["export-clients", *flags]) == 2  # the folders exist: refused, nothing overwritten
    assert "already exist" in capsys.readouterr().err
