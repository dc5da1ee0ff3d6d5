"""The privacy defences do what they say to the messages, train through the split, and run in both runtimes."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.client import Client
from sfprompt.config import Config, ConfigError
from sfprompt.defence import Defence, local_epsilon
from sfprompt.model import SplitViT, create_vit
from sfprompt.runner import run

from conftest import run_benchmark
from test_flower_inline import InlineGrid, flower_task_identity, node_disks, records, run_inline  # noqa: F401 (fixtures)
from test_runner import tiny_config


def split_with(client_blocks=0, pool_tokens=0, defence=Defence(), image_size=64):
    """A tiny random ViT at 64 px: a 4 x 4 patch grid, so the patch tokens can be pooled."""
    torch.manual_seed(0)
    vit = create_vit("test_vit", num_classes=4, image_size=image_size, weights="none")
    return SplitViT(vit, 3, client_blocks, 0, pool_tokens, defence)


@pytest.mark.parametrize("client_blocks", [0, 1])
def test_pooled_tokens_are_the_average_of_each_block_of_patches(client_blocks):
    plain, pooled = split_with(client_blocks), split_with(client_blocks, pool_tokens=2)
    images, prompts = torch.randn(2, 3, 64, 64), plain.new_params().prompts
    full, coarse = plain.head(images, prompts), pooled.head(images, prompts)
    layout = plain.layout
    assert pooled.layout.length == layout.prefix + layout.prompts + 4 and coarse.shape[1] == pooled.layout.length
    grid = full[:, layout.patch_rows].unflatten(1, (4, 4))  # (B, 4, 4, D)
    top_left = grid[:, :2, :2].mean(dim=(1, 2))
    assert torch.allclose(coarse[:, pooled.layout.patch_rows][:, 0], top_left, atol=1e-6)
    assert torch.equal(coarse[:, : layout.prefix + layout.prompts], full[:, : layout.prefix + layout.prompts])


def test_shuffling_permutes_each_samples_patch_tokens_and_nothing_else():
    split = split_with(defence=Defence(shuffle=True))
    images, prompts = torch.randn(3, 3, 64, 64), split.new_params().prompts
    clean = split.head(images, prompts)
    sent = split.send(images, prompts, torch.Generator().manual_seed(1))
    rows = split.layout.patch_rows
    assert torch.equal(sent[:, : rows.start], clean[:, : rows.start])
    assert not torch.equal(sent[:, rows], clean[:, rows])
    for b in range(3):
        assert torch.equal(sent[b, rows].sort(dim=0).values, clean[b, rows].sort(dim=0).values)
    with torch.no_grad():
        assert torch.allclose(split.logits(images, split.new_params(), torch.Generator().manual_seed(2)),
                              split_with().logits(images, split.new_params()), atol=1e-5)


@pytest.mark.parametrize("client_blocks", [0, 1])
def test_clipping_bounds_each_samples_data_dependent_rows_and_noise_has_the_stated_std(client_blocks):
    clipped = split_with(client_blocks, defence=Defence(clip_norm=0.5))
    images, prompts = torch.randn(4, 3, 64, 64) * 3, clipped.new_params().prompts
    sent = clipped.send(images, prompts, None)
    rows = clipped.private_rows
    assert torch.all(sent[:, rows].flatten(1).norm(dim=1) <= 0.5 + 1e-5)
    if client_blocks == 0:  # the prefix and prompt rows carry nothing of the input and are left alone
        assert torch.equal(sent[:, : rows.start], clipped.head(images, prompts)[:, : rows.start])
    noisy = split_with(client_blocks, defence=Defence(clip_norm=0.5, noise_multiplier=2.0))
    difference = noisy.send(images, prompts, torch.Generator().manual_seed(0)) - sent
    assert difference[:, rows].std().item() == pytest.approx(1.0, rel=0.05)  # 2.0 x 0.5


def test_randomized_response_keeps_the_stated_share_and_a_sample_always_shows_one_label():
    defence, classes = Defence(label_epsilon=1.0), 10
    labels = torch.randint(0, classes, (20000,), generator=torch.Generator().manual_seed(0))
    draws = torch.rand(20000, 2, generator=torch.Generator().manual_seed(1))
    shown = defence.randomized_response(labels, draws, classes)
    kept = (shown == labels).float().mean().item()
    assert kept == pytest.approx(math.e / (math.e + classes - 1), abs=0.01)
    changed = (shown - labels)[shown != labels] % classes
    assert set(changed.tolist()) == set(range(1, classes))  # every other class, about equally often
    assert torch.equal(defence.randomized_response(labels, draws, classes), shown)
    assert Defence().randomized_response(labels, draws, classes) is labels


def test_a_clients_private_streams_keep_every_bit_of_a_long_secret():
    """PyTorch's `manual_seed` keeps 32 bits of a seed (5 and 5 + 2^32 draw alike), so a server could try every
    stream a deployed node's noise or randomized labels might come from; a secret below 2^32 (a simulated client's,
    derived from --seed) still draws as `manual_seed` did, so the documented runs repeat."""
    from sfprompt.seeds import derive_seed, private_generator

    def draws(generator):
        return torch.randn(10000, generator=generator)

    assert torch.equal(draws(torch.Generator().manual_seed(5)), draws(torch.Generator().manual_seed(5 + 2**32)))
    secret = 1 << 127 | 0x5EC12E7
    for parts in [(), (3,)]:
        assert not torch.equal(draws(private_generator(secret, *parts)), draws(private_generator(secret + 2**32, *parts)))
        assert not torch.equal(draws(private_generator(secret, *parts)), draws(private_generator(secret | 1 << 90, *parts)))
        assert torch.equal(draws(private_generator(secret, *parts)), draws(private_generator(secret, *parts)))  # resumes
    assert not torch.equal(draws(private_generator(secret, 3)), draws(private_generator(secret, 4)))  # each round anew
    noise = draws(private_generator(secret, 3))
    assert abs(float(noise.mean())) < 0.05 and float(noise.std()) == pytest.approx(1.0, abs=0.05)
    assert torch.equal(draws(private_generator(77)), draws(torch.Generator().manual_seed(77)))
    assert torch.equal(draws(private_generator(77, 3)), draws(torch.Generator().manual_seed(derive_seed(77, 3))))

    def label_draws(private_seed):  # a client's randomized labels come from such a stream
        return Client(0, [None] * 50, list(range(50)), None, None, None, torch.device("cpu"), private_seed).label_draws

    assert not torch.equal(label_draws(secret), label_draws(secret + 2**32))


def test_local_epsilon_follows_the_noise_and_the_number_of_sends():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    assert local_epsilon(4.0, 10, 1e-5) < local_epsilon(2.0, 10, 1e-5) < local_epsilon(2.0, 40, 1e-5)
    assert local_epsilon(0.0, 10, 1e-5) == math.inf
    orders = [1.5, 2, 4, 8, 16, 32, 64]
    # any two inputs are neighbours: sensitivity 2C, so noise multiplier 6 acts as 3 for Opacus's add/remove
    direct, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=3.0, steps=5, orders=orders),
                                  delta=1e-5)
    assert local_epsilon(6.0, 5, 1e-5) <= direct + 1e-9
    # pinned: the sensitivity 2C halves the noise multiplier Opacus sees (with C instead: 3.38 would read 1.63)
    assert local_epsilon(4.0, 10, 1e-5) == pytest.approx(8.0794, abs=1e-4)
    assert local_epsilon(6.0, 5, 1e-5) == pytest.approx(3.3841, abs=1e-4)


def test_an_upload_leaves_as_flowers_local_dp_mod_makes_it_with_the_clients_own_noise():
    import numpy as np

    from sfprompt.defence import private_upload, upload_noise_multiplier

    broadcast = {"prompts": torch.zeros(2, 8), "tail.weight": torch.ones(4, 100)}
    upload = {"prompts": torch.full((2, 8), 3.0), "tail.weight": torch.ones(4, 100) + 4.0}  # a change of norm 80.4

    def change(tensors):
        return torch.cat([(tensors[k] - broadcast[k]).ravel() for k in sorted(broadcast)])

    before = np.random.get_state()[1].copy()
    almost_exact = private_upload(broadcast, upload, 2.0, 1e6, 1e-5, [1, 2, 3, 4])
    assert (np.random.get_state()[1] == before).all()  # NumPy's global generator as it was
    clipped = change(upload) * 2.0 / float(change(upload).norm())
    assert torch.allclose(change(almost_exact), clipped, atol=1e-4)  # clipped to the norm, in the change's direction
    noisy = private_upload(broadcast, upload, 2.0, 1.0, 1e-5, [1, 2, 3, 4])
    noise = change(noisy) - clipped
    assert float(noise.std()) == pytest.approx(upload_noise_multiplier(1.0, 1e-5) * 2.0, rel=0.1)  # 9.7: sens. 2C
    assert torch.equal(noisy["prompts"], private_upload(broadcast, upload, 2.0, 1.0, 1e-5, [1, 2, 3, 4])["prompts"])
    assert not torch.equal(noisy["prompts"], private_upload(broadcast, upload, 2.0, 1.0, 1e-5, [1, 2, 3, 5])["prompts"])
    assert noisy.keys() == upload.keys() and all(t.dtype == torch.float32 for t in noisy.values())
    scalar = private_upload({"t": torch.tensor(0.0)}, {"t": torch.tensor(100.0)}, 2.0, 1e6, 1e-5, [1])["t"]
    assert scalar.shape == () and float(scalar) == pytest.approx(2.0, abs=1e-3)  # a 0-d tensor is clipped too
    unchanged = private_upload(broadcast, dict(broadcast), 2.0, 1.0, 1e-5, [1, 2, 3, 4])  # not dropped: noised alone
    assert float(change(unchanged).std()) == pytest.approx(upload_noise_multiplier(1.0, 1e-5) * 2.0, rel=0.1)
    assert torch.equal(unchanged["prompts"], private_upload(broadcast, dict(broadcast), 2.0, 1.0, 1e-5, [1, 2, 3, 4])["prompts"])
    assert unchanged["tail.weight"].shape == (4, 100) and (np.random.get_state()[1] == before).all()
    with pytest.raises(ValueError, match="not the broadcast's"):
        private_upload(broadcast, {"prompts": upload["prompts"], "tail.bias": torch.ones(4)}, 2.0, 1.0, 1e-5, [1])


def test_the_log_states_each_guarantee_only_where_it_holds_end_to_end():
    from sfprompt.defence import privacy_notice

    def notice(**options):
        return privacy_notice(Config(clip_norm=5.0, noise_multiplier=1.0, **options))

    assert "here nothing does" in notice(keep_ratio=1.0)
    assert "pruning chooses which samples are sent" in notice()
    assert "prompts, uploaded, train on the clean images" in notice(client_blocks=1, keep_ratio=1.0)
    assert "tail, uploaded, trains on clean head features" in notice(local_classifier="shared", keep_ratio=1.0)
    labels = privacy_notice(Config(label_epsilon=1.0))
    assert "1-label-DP" in labels and "no guarantee covers the labels" in labels
    assert "probe rounds (--probe-rounds, --refit-rounds) show its label counts" in labels  # the default's opening
    assert "label counts" not in privacy_notice(Config(probe_rounds=0))  # and closing probe rounds upload statistics
    forward_only = {"prompt_updates": "forward-only", "estimator": "residual"}
    assert "reads each prompt step's loss differences back" in privacy_notice(Config(**forward_only))
    blocked = privacy_notice(Config(client_blocks=1, **forward_only))  # the steps travel only through the blocks
    assert "neither the prompts nor the directions" in blocked and "reads each prompt step's" not in blocked
    assert "randomized-response labels" in privacy_notice(Config(client_blocks=1, label_epsilon=3.0, **forward_only))


@pytest.mark.parametrize("options, message", [
    ({"pool_tokens": -1}, "--pool-tokens"),
    ({"clip_norm": 0.0}, "--clip-norm"),
    ({"noise_multiplier": 1.0}, "needs --clip-norm"),
    ({"clip_norm": 1.0, "noise_multiplier": -1.0}, "--noise-multiplier"),
    ({"dp_delta": 1.0}, "--dp-delta"),
    ({"label_epsilon": -0.5}, "--label-epsilon"),
    ({"method": "fl", "pool_tokens": 1}, "sends no activations"),
    ({"upload_epsilon": 1.0, "probe_rounds": 0}, "go together"),
    ({"upload_clip": 1.0, "probe_rounds": 0}, "go together"),
    ({"upload_clip": math.inf, "upload_epsilon": 1.0, "probe_rounds": 0}, "--upload-clip must be a positive"),
    ({"upload_clip": 1.0, "upload_epsilon": 0.0, "probe_rounds": 0}, "--upload-epsilon must be a positive"),
    # the default recipe opens with a probe round and closes with a refit round, which follows the opening one
    ({"upload_clip": 1.0, "upload_epsilon": 1.0}, r"set --probe-rounds 0 \(the refit rounds then default to 0 too\)$"),
    ({"upload_clip": 1.0, "upload_epsilon": 1.0, "refit_rounds": 1}, "set --probe-rounds 0 and --refit-rounds 0$"),
    ({"upload_clip": 1.0, "upload_epsilon": 1.0, "probe_rounds": 0, "refit_rounds": 1}, "set --refit-rounds 0$"),
    # with 2 rounds the probe rounds derive to 0 beside a refit round, and to 1 once it is gone: both must be named
    ({"upload_clip": 1.0, "upload_epsilon": 1.0, "rounds": 2, "refit_rounds": 1}, "set --probe-rounds 0 and --refit-rounds 0$"),
    ({"upload_clip": 1.0, "upload_epsilon": 1.0, "method": "linear-probe"}, "use another method"),
])
def test_bad_privacy_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Config(**options)


def test_pooling_beyond_the_patch_grid_is_refused():
    with pytest.raises(ConfigError, match="--pool-tokens must be between 0 \\(no pooling\\) and the patch grid's 4"):
        split_with(pool_tokens=5)


DEFENDED = dict(pool_tokens=1, shuffle_tokens=True, clip_norm=5.0, noise_multiplier=0.1, label_epsilon=2.0,
                upload_clip=1.0, upload_epsilon=1000.0)


def test_defences_run_in_process_and_under_flower(imagefolder, tmp_path, flower_task_identity, node_disks):
    """Given the same private seeds (a node's `private-seed`), the Flower apps give the in-process result."""
    config = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=2, rounds=2, image_size=64, **DEFENDED)
    plain = tiny_config(imagefolder, tmp_path, clients=3, clients_per_round=2, rounds=2, image_size=64,
                        out=str(tmp_path / "plain"))
    run(plain, progress=False, log=lambda _: None)
    lines = []
    run(config.replace(out=str(tmp_path / "local")), progress=False, log=lines.append)
    run_inline(config.replace(out=str(tmp_path / "flower")), InlineGrid(3))
    assert any("-DP per sample over 4 sends" in line for line in lines)  # the log states the guarantees
    assert any("noised by Flower's LocalDpMod (std 0.00969 on every value" in line for line in lines)
    for folder in ("local", "flower"):
        rounds = records(tmp_path / folder)
        assert [r["dropped"] for r in rounds] == [[], []]
        # one pooled token a sample instead of 16: the forwards shrink
        assert rounds[0]["bytes_by_phase"]["up/split"] < records(tmp_path / "plain")[0]["bytes_by_phase"]["up/split"]
    local, flower = load_file(tmp_path / "local" / "global.safetensors"), load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.allclose(local[k], flower[k], atol=1e-5, rtol=1e-4) for k in local)
    assert [r["accuracy"] for r in records(tmp_path / "local")] == [r["accuracy"] for r in records(tmp_path / "flower")]


def test_the_upload_dp_benchmark_runs_each_row_and_writes_its_report(tmp_path):
    doc = tmp_path / "upload-dp.md"
    done = run_benchmark("upload_dp.sh", tmp_path, SEEDS="0", ROWS="epsilon-10", CLIP="2", DOC=str(doc))
    assert done.returncode == 0, done.stderr[-3000:]
    text = doc.read_text()
    assert text.startswith("Command: `bash benchmarks/upload_dp.sh`") and "`--upload-clip 2 --upload-epsilon E`" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| epsilon")]
    assert [row[0] for row in rows] == ["| epsilon-10", "| epsilon-10"]  # its accuracy, then what is proven of it
    assert rows[1][1:] == ["1.94", "11.1", "31.4 |"]  # noise std 0.969 x the clip; Opacus' bound, 1 and 5 uploads
    config = json.loads((tmp_path / "runs" / "iid" / "epsilon-10" / "seed-0" / "config.json").read_text())
    assert (config["upload_clip"], config["upload_epsilon"], config["probe_rounds"]) == (2.0, 10.0, 0)



def test_upload_noise_without_flower_stops_the_run_before_its_first_round_yet_its_config_reads(imagefolder, tmp_path,
                                                                                               monkeypatch):
    import importlib.util

    from sfprompt.federation import prepare

    config = tiny_config(imagefolder, tmp_path, upload_clip=1.0, upload_epsilon=1.0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else find_spec(name, *a))
    assert Config.from_dict(config.to_dict()) == config  # a saved run's config still reads (predict, audit --from)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[flower\]'"):
        prepare(config)
