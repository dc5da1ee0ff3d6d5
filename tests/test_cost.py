import json

import numpy as np
import pytest
import torch

from sfprompt.cli import main
from sfprompt.client import Client, TrainSettings
from sfprompt.compare import VARIANTS
from sfprompt.config import Config
from sfprompt.cost import _round, estimate, fake_vit, table
from sfprompt.inprocess import client_round
from sfprompt.meter import Meter
from sfprompt.methods import METHODS
from sfprompt.model import SplitViT, create_vit
from sfprompt.server import BodyServer
from sfprompt.transport import InProcessLink

from conftest import run_benchmark

CONFIG = Config(model="test_vit", image_size=32, prompt_tokens=2, keep_ratio=0.5, batch_size=4)


def measured_round(name: str, samples: int, probe_round: bool = False) -> dict:
    """A real client round of a method or variant (or its run's opening probe round) on `samples` samples in batches
    of 4, counted as a training run counts it."""
    method_name, overrides = VARIANTS.get(name, (name, {}))
    config = CONFIG.replace(method=method_name, **overrides)
    vit = create_vit(CONFIG.model, 10, CONFIG.image_size, "none")
    model = SplitViT.from_config(vit, config)  # its wire format too (the shared rows once)
    data = [(torch.randn(3, 32, 32), i % 10) for i in range(samples)]  # per-class pruning keeps 10 of 12
    settings = TrainSettings.from_config(config)
    method, meter = METHODS[method_name](), Meter()
    method = method.stage(1, config) if probe_round else method
    link = InProcessLink(BodyServer(model, meter, torch.device("cpu")), meter, torch.device("cpu"))
    client = Client(0, data, np.arange(samples), model, settings, meter, torch.device("cpu"))
    client_round(link, client, method, method.new_params(model), seed=0)  # as the in-process runtime does
    return meter.take()


@pytest.mark.parametrize("method", [*sorted(METHODS), "sfprompt-forward-only"])
def test_scaled_probe_equals_a_real_round(method):
    """Probing one batch of 4 samples (one epoch per phase) and scaling to 12 gives what a real round on 12
    samples (3 batches, two split epochs, per-class pruning as `run` prunes) measures, peak memory included."""
    estimated = estimate(CONFIG, samples_per_client=12, num_classes=10, methods=[method])[method]
    real = measured_round(method, 12)
    # Forward-only's prompt step (K directions weighted into the prompts' size) is a cost a batch, not a sample: the
    # real round's partial batch pays it once more than scaling by samples does. (Its directions travel as a seed.)
    assert estimated["client_flops"] == pytest.approx(real["client_flops"], rel=1e-4 if "forward-only" in method else 0)
    assert estimated["server_flops"] == real["server_flops"]
    assert estimated["client_peak_memory_bytes"] == pytest.approx(real["client_peak_memory_bytes"], rel=0.02)
    # Tensor bytes scale exactly; message headers (about 150 bytes each) scale with the samples too,
    # while the real round sends fewer, fuller batches when pruning leaves a partial probe batch.
    messages = sum(real["messages_by_phase"].values())
    assert abs(estimated["bytes_up"] - real["bytes_up"]) < 200 * messages
    assert abs(estimated["bytes_down"] - real["bytes_down"]) < 200 * messages
    if not method.startswith("sfprompt"):  # whole batches everywhere: only the losses' JSON text differs
        assert estimated["bytes_down"] == real["bytes_down"]


def test_a_probe_round_is_costed_as_a_real_one_and_only_where_a_run_has_one():
    """The default recipe's opening and refit rounds (the linear probe, through its prompts) get a row of their own,
    equal to a real probe round; methods whose runs have none (fl, sfl, the linear probe itself) get none."""
    estimated = estimate(CONFIG, samples_per_client=12, num_classes=10, methods=["sfprompt", "fl", "sfl", "linear-probe"])
    assert sorted(estimated) == ["fl", "linear-probe", "sfl", "sfprompt", "sfprompt: a probe round"]
    probe_round, real = estimated["sfprompt: a probe round"], measured_round("sfprompt", 12, probe_round=True)
    assert real["bytes_by_phase"]["up/probe"] > 0 and "up/split" not in real["bytes_by_phase"]
    for key in ("client_flops", "server_flops", "bytes_up", "bytes_down"):
        assert probe_round[key] == real[key], key
    # the prompts ride in the features: more server FLOPs than the prompt-free probe's, fewer than a split round's
    assert estimated["linear-probe"]["server_flops"] < probe_round["server_flops"] < estimated["sfprompt"]["server_flops"]
    assert "sfprompt: a probe round" not in estimate(CONFIG.replace(probe_rounds=0), 12, 10, ["sfprompt"])
    # a run that only closes with a refit round has one too, and so has sfprompt costed beside options of another
    # method that it refuses (--train-body): its round under those options, its probe rounds as its runs have them
    refit_only = estimate(CONFIG.replace(probe_rounds=0, refit_rounds=1), 12, 10, ["sfprompt"])
    beside_sfl = estimate(CONFIG.replace(method="sfl", train_body=True), 12, 10, ["sfprompt", "sfl"])
    assert refit_only["sfprompt: a probe round"] == beside_sfl["sfprompt: a probe round"] == probe_round
    assert "sfl: a probe round" not in beside_sfl
    # in the table, variants that differ in their own rounds only share one probe-round row, named after each
    variants = estimate(CONFIG, 12, 10, ["sfprompt", "sfl", "sfprompt-no-pruning", "sfprompt-no-local-loss"])
    assert variants["sfprompt-no-pruning: a probe round"] == variants["sfprompt: a probe round"] == probe_round
    names = [line.split(" | ")[0].removeprefix("| ") for line in table(variants).splitlines()[2:]]
    assert names == ["sfprompt", "sfprompt, sfprompt-no-pruning, sfprompt-no-local-loss: a probe round", "sfl",
                     "sfprompt-no-pruning", "sfprompt-no-local-loss"]


def test_upload_noise_changes_no_cost_and_the_probe_is_still_costed():
    """--upload-epsilon noises an upload without changing its size; `cost` also costs the methods (the linear probe)
    whose uploads the mod could not noise."""
    noised = CONFIG.replace(probe_rounds=0, upload_clip=1.0, upload_epsilon=1.0)
    plain = estimate(CONFIG.replace(probe_rounds=0), 12, 10, ["sfprompt", "linear-probe"])
    assert estimate(noised, 12, 10, ["sfprompt", "linear-probe"]) == plain
    assert estimate(noised, 12, 10, ["sfprompt-probe-warm"])  # a variant that opens with a probe round


def test_forward_only_with_client_blocks_is_costed_whatever_the_shared_rows():
    """The counting round leaves the blocks out (its sample counts are theirs): forward-only with client blocks,
    which takes --shared-rows per-sample (the paper's recipe), is costed, below backprop's client FLOPs there."""
    blocked = CONFIG.replace(client_blocks=1, shared_rows="per-sample", estimator="residual")
    backprop = estimate(blocked, 12, 10, ["sfprompt"])["sfprompt"]
    forward_only = estimate(blocked.replace(prompt_updates="forward-only"), 12, 10, ["sfprompt"])["sfprompt"]
    assert forward_only["client_flops"] < backprop["client_flops"]


def test_cost_command_writes_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = ["cost", "--model", "test_vit", "--image-size", "32", "--samples-per-client", "40", "--probe-samples",
            "2", "--methods", "fl,sfprompt", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert saved["inputs"]["samples_per_client"] == 40
    fl, sfp = saved["per_client_per_round"]["fl"], saved["per_client_per_round"]["sfprompt"]
    assert sfp["client_flops"] < fl["client_flops"] and sfp["bytes_down"] < fl["bytes_down"]
    assert "| sfprompt |" in capsys.readouterr().out


def test_the_docs_cost_table_script_writes_each_format(tmp_path):
    """benchmarks/cost.sh (docs/cost.md's table) at a tiny size, two of its formats: a JSON each, and the ratios."""
    done = run_benchmark("cost.sh", tmp_path, MODELS="test_vit", OUT=str(tmp_path / "cost"), FORMATS="float32:per-sample int8:once",
                         SIZE="--image-size 32 --samples-per-client 40 --batch-size 4")
    assert done.returncode == 0, done.stderr
    written = sorted(path.name for path in (tmp_path / "cost").glob("*.json"))
    assert written == ["test_vit-float32-per-sample.json", "test_vit-int8-once.json"]
    ratios = [float(line.split("|")[3].strip().rstrip("x")) for line in done.stdout.splitlines() if "| test_vit |" in line]
    assert len(ratios) == 2 and ratios[0] > 2 * ratios[1]  # int8 with the rows once: well under the paper's format


@pytest.mark.parametrize("options", [dict(client_blocks=1, clip_norm=1.0, noise_multiplier=1.0), dict(wire_dtype="int8"),
                                     dict(wire_dtype="float16", precision="fp16"), dict(precision="bf16", pool_tokens=2),
                                     dict(label_epsilon=2.0, shared_rows="per-sample"), dict(method="sfl", train_body=True)],
                         ids=lambda options: ",".join(options))
def test_a_round_on_fake_weights_counts_what_a_real_one_does(options):
    """What `cost` runs (fake weights) against the same round on real ones: every FLOP, the peak memory and every
    message's bytes equal, but for the upload's report of the round's losses (the fake round has none)."""
    config = CONFIG.replace(**options)
    settings = TrainSettings.from_config(config, mean_samples=12)
    torch.manual_seed(0)
    real, real_samples = _round(config, create_vit("test_vit", 10, 32, "none"), config.method, 12, 10, settings)
    fake, fake_samples = _round(config, fake_vit("test_vit", 10, 32), config.method, 12, 10, settings)
    assert real_samples == fake_samples
    for key in ("flops_by_phase", "messages_by_phase", "client_peak_memory_bytes", "bytes_down"):
        assert fake[key] == real[key], key
    assert {k: v for k, v in fake["bytes_by_phase"].items() if k != "up/upload"} == \
           {k: v for k, v in real["bytes_by_phase"].items() if k != "up/upload"}
    assert abs(fake["bytes_by_phase"]["up/upload"] - real["bytes_by_phase"]["up/upload"]) <= 64
