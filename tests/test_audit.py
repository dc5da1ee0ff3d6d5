"""`sfprompt audit`: the attacks are strong enough to be believed, and each defence is attacked as it runs."""

import json

import pytest
import torch

from sfprompt.audit import AuditOptions, run_audit
from sfprompt.cli import main
from sfprompt.config import Config, ConfigError
from sfprompt.runner import run

from conftest import ROOT, SHARED_DATA, SHARED_WEIGHTS, needs_shared, run_benchmark, write_imagefolder

# Small, quick attacks: enough to tell a protocol that leaks from one that does not.
QUICK = AuditOptions(images=12, aux_samples=60, gallery=12, steps=40, inversion_epochs=3)
LABELS = AuditOptions(images=2, aux_samples=30, gallery=2, steps=1, inversion_epochs=1)  # for the label figures alone


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("gray"), classes=3, train_per_class=24, test_per_class=20, gray=True)


def audit_config(folder, tmp_path, **changes):
    """A randomly initialised ViT-S/14 at 28 px (2 x 2 patches of 14 x 14 pixels, 384 numbers each): its
    embedding of a grayscale image is injective, as the real ViT-S/14's and ViT-B/16's are."""
    options = dict(dataset="imagefolder", data_dir=str(folder), model="vit_small_patch14_dinov2", weights="none",
                   image_size=28, prompt_tokens=2, clients=2, clients_per_round=2, rounds=1, batch_size=8,
                   out=str(tmp_path / "audit"))
    return Config(**(options | changes))


def witnessed_run(folder, tmp_path, **changes):
    """A whole run of `audit_config` witnessed at client 0 (`audit.witness_run`): the federation, what the server
    saw, the final params, the victim's upload, the samples it sent (ids, ascending) and each one's true label."""
    from sfprompt.audit import witness_run
    from sfprompt.federation import prepare

    fed = prepare(audit_config(folder, tmp_path, **changes))
    seen, final = witness_run(fed, 0, lambda _: None)
    upload = fed.method.new_params(fed.model)
    upload.load_state_dict(seen.upload.tensors)
    ids = seen.positions.unique()
    truth = torch.stack([seen.labels[seen.positions == p][0] for p in ids])
    return fed, seen, final, upload, ids, truth


def test_the_attacks_recover_undefended_images_and_labels(gray, tmp_path):
    result = run_audit(audit_config(gray, tmp_path), QUICK, progress=False, log=lambda _: None)
    best, labels = result["reconstruction"]["best"], result["labels"]
    assert result["reconstruction"]["affine"]["psnr"] >= 30  # the closed-form solve returns the input
    assert best["psnr"] >= 30 and best["reidentified"] == 1.0
    assert labels["gradient"] >= 0.9 and labels["best_attack"] >= 0.9
    assert result["images_attacked"] == QUICK.images and result["sends_per_image"] == 2  # two split epochs
    written = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert written["reconstruction"] == result["reconstruction"]
    assert set(written["reconstruction"]) == {"class_mean", "affine", "optimisation", "learned", "best"}
    assert (tmp_path / "audit" / "audit.png").stat().st_size > 1000


@pytest.mark.parametrize("optimizer, prompt_lr", [("adam", 3e-4), ("sgd", 0.1)])
def test_a_residual_forward_only_round_is_attacked_through_both_batches_of_each_step(gray, tmp_path, optimizer,
                                                                                    prompt_lr):
    """A residual step's coefficient is its batch's loss less the previous batch's: the attack's model explains it
    at the true labels of both (all but the client's float32 rounding), from the round's second step on (its first
    moves nothing, and Adam's step count starts at the second; counting it as step 1 leaves about 3e-4 unexplained
    here); under SGD with the factor 1, which pins the step's sign and size; over two rounds, each read from its own
    broadcast (no loss carried from one round to the next); and under --label-epsilon at the randomized ones."""
    config = audit_config(gray, tmp_path, prompt_updates="forward-only", estimator="residual", perturbation=0.3,
                          optimizer=optimizer, prompt_lr=prompt_lr)
    labels = run_audit(config, LABELS, progress=False, log=lambda _: None)["labels"]
    assert labels["steps_read"] == 4  # six evaluates: five steps seen, the first of which moved nothing
    assert labels["unexplained_at_truth"] < 1e-9
    if optimizer == "adam":
        from dataclasses import replace

        whole = config.replace(rounds=2, probe_rounds=0, keep_ratio=1.0, split_epochs=1, out=str(tmp_path / "whole"))
        labels = run_audit(whole, replace(LABELS, sends="run"), progress=False, log=lambda _: None)["labels"]
        assert labels["steps_read"] == 2 * 3  # 5 sends a round: 4 steps seen, the first moving nothing
        assert labels["unexplained_at_truth"] < 1e-9
    randomized = run_audit(config.replace(label_epsilon=0.0), LABELS, progress=False, log=lambda _: None)["labels"]
    assert randomized["unexplained_at_truth"] < 1e-9 and randomized["steps_read"] == 4


def test_with_client_blocks_a_residual_round_shows_no_trajectory_and_its_sends_are_noted_as_made(gray, tmp_path):
    """With client blocks no seed travels and the prompts reach the server only through the client's blocks: no
    trajectory is read, and the label attacks are the label-free guess's (the audit does not invert the blocks).
    The audit's record of each send is the perturbed prompts the client's blocks ran with."""
    changes = {"method": "sfl", "prompt_updates": "forward-only", "estimator": "residual", "perturbation": 0.3,
               "client_blocks": 1}  # (sfl: no local phase moves the prompts before the first send)
    labels = run_audit(audit_config(gray, tmp_path, **changes), LABELS, progress=False, log=lambda _: None)["labels"]
    assert "client blocks" in labels["trajectory_skipped"] and "trajectory" not in labels
    assert labels["best_attack"] == labels["best_label_free"] and labels["advantage"] == 0
    fed, seen, _, _, _, _ = witnessed_run(gray, tmp_path, **changes)
    first = seen.batch == 0
    images = torch.stack([seen.images[int(p)] for p in seen.positions[first]])
    with torch.no_grad():
        assert torch.allclose(fed.clients[0].model.send(images, seen.params[0][0], None), seen.tokens[first], atol=1e-6)
        assert not torch.allclose(fed.clients[0].model.send(images, seen.broadcasts[0]["prompts"], None),
                                  seen.tokens[first], atol=1e-3)  # not the prompts as they were


def test_a_probe_sends_its_images_once_and_its_statistics_give_the_labels_away(gray, tmp_path):
    result = run_audit(audit_config(gray, tmp_path, method="linear-probe"), QUICK, progress=False, log=lambda _: None)
    labels = result["labels"]
    assert result["reconstruction"]["affine"]["psnr"] >= 30 and result["sends_per_image"] == 1
    assert result["activation_privacy"]["releases_per_sample"] == 1
    assert set(labels) >= {"label_free", "statistics", "class_means", "best_attack"} and "gradient" not in labels
    assert labels["best_attack"] >= 0.9 > labels["label_free"]  # its own class means name its own samples


@pytest.mark.parametrize("optimizer, prompt_lr", [("adam", 3e-4), ("sgd", 0.1)])
def test_a_forward_only_round_is_attacked_through_its_prompt_trajectory(gray, tmp_path, optimizer, prompt_lr):
    """No gradient is sent, yet the prompts of successive evaluates give each step's loss differences back: at the
    true labels the attack's model of the steps explains them (all but the client's float32 rounding). (The tiny
    random model's classes differ too little in loss for its labels to follow: tests/test_trajectory.py checks
    the inference, docs/privacy.md has the real checkpoint's.)"""
    config = audit_config(gray, tmp_path, prompt_updates="forward-only", directions=8, perturbation=0.3,
                          optimizer=optimizer, prompt_lr=prompt_lr)
    labels = run_audit(config, LABELS, progress=False, log=lambda _: None)["labels"]
    assert labels["steps_read"] == 5  # six evaluates (24 kept samples, 2 epochs, batches of 8): five steps seen
    assert labels["unexplained_at_truth"] < 1e-3
    if optimizer == "adam":  # over a whole run (here two rounds of every sample), each round's trajectory is read from
        # its own broadcast, with Adam's unknown factor one a round, and the steps of both explain the labels together
        from dataclasses import replace

        whole = config.replace(rounds=2, probe_rounds=0, keep_ratio=1.0, split_epochs=1, out=str(tmp_path / "whole"))
        labels = run_audit(whole, replace(LABELS, sends="run"), progress=False, log=lambda _: None)["labels"]
        assert labels["steps_read"] == 2 * 4  # 36 samples in batches of 8: 5 sends a round, 4 steps seen
        assert labels["unexplained_at_truth"] < 1e-3
    assert {"trajectory", "trajectory_broadcast_tail"} <= set(labels) and "gradient" not in labels
    assert set(labels["one_step"]) == {"label_free", "trajectory"}
    # With --label-epsilon the steps are taken at the randomized labels (at epsilon 0, two thirds of them wrong
    # here): the attack's model explains them at those.
    randomized = run_audit(config.replace(label_epsilon=0.0), LABELS, progress=False, log=lambda _: None)["labels"]
    assert randomized["unexplained_at_truth"] < 1e-3 and randomized["steps_read"] == 5
    if optimizer == "adam":  # SGD's weight decay is read like its momentum; Adam's is not
        skipped = run_audit(config.replace(weight_decay=0.1), LABELS, progress=False, log=lambda _: None)["labels"]
        assert "weight decay" in skipped["trajectory_skipped"] and skipped["best_attack"] == skipped["label_free"]


def test_an_audit_starts_where_a_runs_own_rounds_start_after_its_probe_round(gray, tmp_path):
    """Without --from, the audit attacks a round after the probe round the default recipe opens with, played as a run
    plays it (not a round from a random tail that no run makes); a probe round --eval-every skips is fine."""
    from safetensors.torch import load_file

    from sfprompt.audit import _trained
    from sfprompt.federation import prepare

    config = audit_config(gray, tmp_path, rounds=2, eval_every=2)
    assert config.probe_rounds == 1

    class Stop(Exception):
        pass

    def stop_after_the_probe_round(line: str) -> None:
        if line.startswith("round 1/2"):
            raise Stop

    with pytest.raises(Stop):
        run(config.replace(out=str(tmp_path / "run")), progress=False, log=stop_after_the_probe_round)
    fed = prepare(config.replace(out=str(tmp_path / "audit")))
    played = _trained(fed, None, 0, lambda _: None)[0].state_dict()  # what the audit's victim starts from
    saved = load_file(str(tmp_path / "run" / "global.safetensors"))
    assert torch.equal(played["tail.head.weight"], saved["tail.head.weight"])
    assert not torch.equal(played["tail.head.weight"], fed.method.new_params(fed.model).state_dict()["tail.head.weight"])


def test_an_audit_with_very_few_auxiliary_images_runs(gray, tmp_path):
    options = AuditOptions(images=2, aux_samples=3, gallery=2, steps=2, inversion_epochs=1)
    result = run_audit(audit_config(gray, tmp_path), options, progress=False, log=lambda _: None)
    assert result["aux_images"] == 3 and "affine" in result["reconstruction"]


def test_a_compact_wire_format_is_no_defence(gray, tmp_path):
    """The server decodes int8 activations with their shared rows sent once, and attacks what it decoded."""
    result = run_audit(audit_config(gray, tmp_path, wire_dtype="int8", shared_rows="once"), QUICK, progress=False,
                       log=lambda _: None)
    assert result["reconstruction"]["best"]["psnr"] >= 25 and result["reconstruction"]["best"]["reidentified"] == 1.0
    assert result["labels"]["best_attack"] >= 0.9


def test_shuffled_tokens_are_put_back_in_place(gray, tmp_path):
    """Shuffling the patch tokens changes nothing for an attacker who knows the position embeddings."""
    result = run_audit(audit_config(gray, tmp_path, shuffle_tokens=True), QUICK, progress=False, log=lambda _: None)
    assert result["reconstruction"]["affine"]["psnr"] >= 30


def test_coarser_tokens_give_coarser_reconstructions(gray, tmp_path):
    plain = run_audit(audit_config(gray, tmp_path), QUICK, progress=False, log=lambda _: None)
    pooled = run_audit(audit_config(gray, tmp_path, pool_tokens=1), QUICK, progress=False, log=lambda _: None)
    assert pooled["reconstruction"]["affine"]["psnr"] < plain["reconstruction"]["affine"]["psnr"] - 10


def test_the_closed_form_undoes_clipping(gray, tmp_path):
    """Clipping scales each sample's rows by its own factor: the attacker solves for it beside the pixels."""
    clipped = run_audit(audit_config(gray, tmp_path, clip_norm=1.0), QUICK, progress=False, log=lambda _: None)
    assert clipped["reconstruction"]["affine"]["psnr"] >= 30 and clipped["reconstruction"]["best"]["reidentified"] == 1


def test_noised_sends_are_attacked_by_every_attack(gray, tmp_path):
    config = audit_config(gray, tmp_path, clip_norm=1.0, noise_multiplier=0.1)
    result = run_audit(config, QUICK, progress=False, log=lambda _: None)
    assert {"affine", "optimisation", "learned", "best"} <= set(result["reconstruction"])
    assert "skipped" not in result["reconstruction"]["affine"]
    assert result["activation_privacy"]["epsilon"] > 0 and result["activation_privacy"]["noise_std"] == pytest.approx(0.1)


def test_randomized_labels_leave_the_gradients_little_to_tell(gray, tmp_path):
    """With label epsilon 0 the gradient is that of a label drawn uniformly: it says nothing of the true one."""
    options = AuditOptions(images=4, aux_samples=30, gallery=4, steps=2, inversion_epochs=1)
    config = audit_config(gray, tmp_path, label_epsilon=0.0, keep_ratio=1.0)
    result = run_audit(config, options, progress=False, log=lambda _: None)
    assert result["labels"]["samples"] >= 30
    assert result["labels"]["gradient"] <= 0.6  # chance is 1/3; without the defence it is 1.0
    assert result["label_privacy"]["keep_probability"] == pytest.approx(1 / 3)


def test_audit_from_a_finished_run_and_clear_refusals(gray, tmp_path, capsys):
    config = audit_config(gray, tmp_path, out=str(tmp_path / "run"))
    run(config, progress=False, log=lambda _: None)
    assert main(["audit", "--from", str(tmp_path / "run"), "--images", "4", "--aux-samples", "30", "--gallery", "4",
                 "--steps", "2", "--inversion-epochs", "1", "--uploads", "aggregated", "--no-progress"]) == 0
    result = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert result["params"] == str(tmp_path / "run") and result["config"] == config.to_dict()
    assert result["audit"]["uploads"] == "aggregated" and "upload_alone" in result["labels"]
    assert "without secure aggregation" in capsys.readouterr().err
    assert main(["audit", "--from", str(tmp_path / "run"), "--rounds", "3"]) == 2
    assert "only --device and --out" in capsys.readouterr().err
    assert main(["audit", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere"), "--images", "4",
                 "--aux-samples", "30", "--gallery", "4", "--steps", "2", "--inversion-epochs", "1",
                 "--no-progress"]) == 0  # the audit in a folder of its own, the run's left as it was
    elsewhere = json.loads((tmp_path / "elsewhere" / "audit.json").read_text())
    assert elsewhere["params"] == str(tmp_path / "run") and elsewhere["config"]["out"] == str(tmp_path / "elsewhere")
    assert json.loads((tmp_path / "run" / "audit.json").read_text()) == result
    assert main(["audit", "--from", str(tmp_path / "nothing")]) == 2
    with pytest.raises(ConfigError, match="sends no activations"):
        run_audit(audit_config(gray, tmp_path, method="fl"), QUICK, progress=False)
    with pytest.raises(ConfigError, match="--gallery"):
        run_audit(audit_config(gray, tmp_path), AuditOptions(gallery=1), progress=False)
    with pytest.raises(ConfigError, match="--uploads must be seen or aggregated"):
        run_audit(audit_config(gray, tmp_path), AuditOptions(uploads="hidden"), progress=False)
    for refused, why in (({"method": "sl"}, "one after another"), ({"clients_per_round": 1}, "2 to")):
        with pytest.raises(ConfigError, match=f"--uploads aggregated: .*{why}"):  # where SecAgg+ cannot hide an upload
            run_audit(audit_config(gray, tmp_path, **refused), AuditOptions(uploads="aggregated"), progress=False)


@pytest.mark.slow
@needs_shared
def test_the_attacks_break_the_undefended_protocol_on_the_real_checkpoint(tmp_path):
    """The real pre-trained ViT-S/14 on Fashion-MNIST at 56 px, as in docs/privacy.md, at a smaller size."""
    config = Config(dataset="fashion-mnist", data_dir=str(SHARED_DATA), weights=str(SHARED_WEIGHTS), image_size=56,
                    clients=4, clients_per_round=2, rounds=1, train_samples=1000, test_samples=200, out=str(tmp_path))
    options = AuditOptions(images=10, aux_samples=200, gallery=10, steps=20, inversion_epochs=2)  # the closed form is exact
    result = run_audit(config, options, progress=False, log=lambda _: None)
    assert result["reconstruction"]["best"]["psnr"] >= 30 and result["reconstruction"]["best"]["reidentified"] == 1.0
    assert result["labels"]["best_attack"] >= 0.9


@pytest.mark.slow
@needs_shared
def test_the_privacy_benchmark_reruns_and_writes_its_table(tmp_path):
    """`bash benchmarks/privacy.sh`, docs/privacy.md's command, end to end at a tiny size: runs, audits, table."""
    document = tmp_path / "privacy.md"
    document.write_text("before\n<!-- privacy-table -->\nstale\n<!-- /privacy-table -->\nafter\n")
    done = run_benchmark("privacy.sh", tmp_path, DOC=str(document), ROWS="shuffle forward-only-1", SEEDS="0 1",
                         SENDS="round")  # two rows: the table's rows are one loop, each row's runs the cost
    assert done.returncode == 0, done.stderr[-3000:]
    text = document.read_text()
    assert text.startswith("before\n<!-- privacy-table -->\n| configuration |") and "stale" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 and rows[0].startswith("| shuffle |") and all("(2 seeds)" in row for row in rows)
    assert "`--shuffle-tokens`" in rows[0]
    assert "`--prompt-updates forward-only --directions 1 --shared-rows once`" in rows[1]  # no gradient message
    assert (tmp_path / "privacy" / "shuffle.png").is_file()
    audit = tmp_path / "runs" / "shuffle" / "seed-0" / "audit.json"
    assert json.loads(audit.read_text())["sends"] == "round" and "sends of one round" in text
    again = run_benchmark("privacy.sh", tmp_path, DOC=str(document), ROWS="shuffle", SEEDS="0")  # the default: run
    assert again.returncode == 0, again.stderr[-3000:]  # the runs reused, the round's audit redone over the run
    assert json.loads(audit.read_text())["sends"] == "run" and "done before" in again.stdout
    assert "over the whole run" in document.read_text()
    kept = audit.stat().st_mtime_ns
    for sends in ("run", "round"):  # a whole run's audit is not redone, nor redone as one round's
        assert run_benchmark("privacy.sh", tmp_path, DOC=str(document), ROWS="shuffle", SEEDS="0",
                             SENDS=sends).returncode == 0
    assert audit.stat().st_mtime_ns == kept


def test_the_privacy_table_names_a_forward_only_rows_estimate_only_where_it_is_not_the_default(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from privacy_table import options

    forward_only = Config(prompt_updates="forward-only", shared_rows="once").to_dict()
    assert options(forward_only) == "--prompt-updates forward-only --directions 1 --shared-rows once"
    assert options(forward_only | {"estimator": "one-sided", "perturbation": 0.01}) == \
        "--prompt-updates forward-only --directions 1 --shared-rows once --estimator one-sided --perturbation 0.01"
    assert options(Config(estimator="one-sided").to_dict()) == "(none)"  # backprop's rows: no estimate to name


def test_a_mixed_federation_is_audited_at_the_victims_own_split_point(gray, tmp_path):
    """With --client-budgets the server knows where each client's head ends and attacks that head: the
    audit of a mixed federation's client is the audit of a federation where every head ends there."""
    from dataclasses import replace

    from sfprompt.federation import prepare
    from sfprompt.splits import head_gflop

    config = audit_config(gray, tmp_path, seed=1)
    costs = head_gflop(prepare(config).model)
    mixed = config.replace(client_budgets=f"{costs[0]:.9f},{costs[1]:.9f}")
    splits = [client.model.client_blocks for client in prepare(mixed).clients]
    assert sorted(splits) == [0, 1]  # the seeded draw gives one of each
    for victim in (0, 1):
        options = replace(QUICK, victim=victim)
        result = run_audit(mixed, options, progress=False, log=lambda _: None)
        alone = run_audit(config.replace(client_blocks=splits[victim]), options, progress=False, log=lambda _: None)
        assert result["victim_client_blocks"] == alone["victim_client_blocks"] == splits[victim]
        assert result["reconstruction"] == alone["reconstruction"] and result["labels"] == alone["labels"]


def test_each_samples_clipping_factor_is_recovered():
    """The closed form's scale search on a known affine path: without noise every sample's 1/c to 1e-4 (clipped
    or not, never below 1), with noise to a few percent."""
    from sfprompt.attacks import _unclipping_scales

    generator = torch.Generator().manual_seed(0)
    m, n, samples = 60, 20, 200
    matrix = torch.randn(m, n, generator=generator, dtype=torch.float64)
    offset = 3 * torch.randn(m, generator=generator, dtype=torch.float64)
    aux = torch.rand(2000, n, generator=generator, dtype=torch.float64)
    covariance = torch.cov(aux.T) + 1e-3 * torch.eye(n, dtype=torch.float64)
    basis, singular, _ = torch.linalg.svd(matrix @ torch.linalg.cholesky(covariance), full_matrices=False)
    clean = torch.rand(samples, n, generator=generator, dtype=torch.float64) @ matrix.T + offset
    clip = float(clean.norm(dim=1).median())  # half the samples clipped, half not
    truth = (clean.norm(dim=1) / clip).clamp_min(1)
    prior = ((aux @ matrix.T + offset).norm(dim=1) / clip).clamp_min(1).log()
    expected = aux.mean(0) @ matrix.T + offset
    for noise_var, tolerance in ((0.0, 1e-4), (1e-2, 0.05)):
        noise = noise_var**0.5 * torch.randn(samples, m, generator=generator, dtype=torch.float64)
        found = _unclipping_scales(singular**2, basis, clean / truth[:, None] + noise, expected, noise_var,
                                   float(1e-9 * singular.pow(2).mean()), prior)
        assert found.min() >= 1 and ((found - truth) / truth).abs().max() < tolerance


def test_with_randomized_labels_forward_only_prompts_step_on_them_and_the_tail_on_the_true_ones(gray, tmp_path):
    """--label-epsilon changes the labels a forward-only client's prompt steps are taken at, never its tail's: the
    first step moves the prompts differently, and leaves the tail as it leaves it without randomized labels."""
    from sfprompt.audit import _trained, witness
    from sfprompt.federation import prepare

    seen = {}
    for epsilon in (None, 0.0):
        config = audit_config(gray, tmp_path, prompt_updates="forward-only", directions=2, perturbation=0.3,
                              label_epsilon=epsilon, out=str(tmp_path / f"witness-{epsilon}"))
        fed = prepare(config)
        seen[epsilon] = witness(fed, *_trained(fed, None, 0, lambda _: None), victim=0).evaluates
    true, randomized = seen[None], seen[0.0]
    assert torch.equal(true[0].prompts, randomized[0].prompts) and not torch.equal(true[1].prompts, randomized[1].prompts)
    assert all(torch.equal(true[1].tail[name], randomized[1].tail[name]) for name in true[1].tail)
    assert not torch.equal(true[0].shown, randomized[0].shown)  # at epsilon 0 most shown labels are wrong


@pytest.mark.parametrize("method", ["sfprompt", "linear-probe", "forward-only"])
def test_under_secure_aggregation_the_server_guesses_through_the_tail_it_broadcast(gray, tmp_path, method):
    """--uploads aggregated: the server holds the tail it broadcast, not the victim's uploaded one (trained on its
    labels), so its own guess reads each send through that, and the upload's own guess is stated beside it: the
    label-free guess of --uploads seen (or, for a probe, its statistics' attacks). A probe's statistics then give no
    attack; forward-only's trajectory is still read, its steps explained at the true labels. Backprop's gradients
    are read through the tail that computed each (the upper bound), and through the tail the server holds."""
    from sfprompt.attacks import per_sample
    from sfprompt.audit import _label_accuracy, _trained, witness
    from sfprompt.federation import prepare

    options = ({"prompt_updates": "forward-only", "directions": 8, "perturbation": 0.3} if method == "forward-only"
               else {"method": method, "lr": 1.0})  # the tail moves far in the round
    fed = prepare(audit_config(gray, tmp_path, probe_rounds=0, **options))
    broadcast, kept = _trained(fed, None, 0, lambda _: None)
    seen = witness(fed, broadcast, kept, victim=0)
    upload = fed.method.new_params(fed.model)
    upload.load_state_dict(seen.upload.tensors)
    in_clear, _ = _label_accuracy(fed, 0, upload, seen, aggregated=False)
    aggregated, samples = _label_accuracy(fed, 0, upload, seen, aggregated=True)
    truth = torch.stack([seen.labels[seen.positions == p][0] for p in seen.positions.unique()])
    with torch.no_grad():
        guess = per_sample(broadcast.tail(seen.rows).log_softmax(dim=1), seen.positions).argmax(dim=1)
    assert aggregated["label_free"] == float((guess == truth).float().mean()) and samples == len(truth)
    assert "upload_alone" not in in_clear
    if method == "linear-probe":
        assert aggregated["upload_alone"] == max(in_clear["statistics"], in_clear["class_means"])
        assert "statistics" not in aggregated and aggregated["best_attack"] == aggregated["label_free"]
    else:
        assert aggregated["upload_alone"] == in_clear["label_free"]
        assert not torch.equal(upload.tail.state_dict()["head.weight"], broadcast.tail.state_dict()["head.weight"])
    if method == "sfprompt":  # each gradient through the tail that computed it; and through the tail the server holds
        from sfprompt.attacks import label_attacks
        from sfprompt.audit import _tail_of

        share = lambda guess: float((guess == truth).float().mean())  # noqa: E731
        read = lambda tails: label_attacks(upload.tail, seen.rows, seen.grads, seen.positions, 3, 1.0,  # noqa: E731
                                           seen.graded, tails, seen.batch)["gradient"]
        own = read([_tail_of(upload.tail, tail) for _, tail in seen.params])
        assert in_clear["gradient"] == aggregated["gradient"] == share(own)
        at_broadcast = share(read([broadcast.tail] * len(seen.params)))  # far from the tails that computed them
        assert in_clear["gradient_broadcast_tail"] == aggregated["gradient_broadcast_tail"] == at_broadcast < share(own)
    if method == "forward-only":
        assert aggregated["unexplained_at_truth"] < 1e-3 and aggregated["steps_read"] == in_clear["steps_read"]
    else:
        assert aggregated.keys() - {"upload_alone"} == in_clear.keys() - ({"statistics", "class_means"}
                                                                          if method == "linear-probe" else set())


def test_under_secure_aggregation_a_whole_run_is_read_through_the_newest_tail_broadcast(gray, tmp_path):
    """Over a run (a probe round, a split round, a refit round), the server's guess reads every send through the
    newest tail it broadcast to the victim (the probe round's broadcast has a classifier not yet fitted), and each
    gradient through the tail broadcast for its own round."""
    from sfprompt.attacks import label_attacks, per_sample
    from sfprompt.audit import _label_accuracy, _tail_of, _tail_state

    fed, seen, _, upload, _, truth = witnessed_run(gray, tmp_path, rounds=3, lr=1.0)
    labels, _ = _label_accuracy(fed, 0, upload, seen, aggregated=True)
    assert seen.rounds == 3 and seen.sent_in.unique().tolist() == [0, 1, 2]
    share = lambda guess: float((guess == truth).float().mean())  # noqa: E731
    tails = [_tail_of(upload.tail, _tail_state(b)) for b in seen.broadcasts]
    with torch.no_grad():
        assert labels["label_free"] == share(per_sample(tails[-1](seen.rows).log_softmax(1), seen.positions).argmax(1))
    graded = seen.batch[seen.graded].unique().tolist()
    of_round = [tails[int(seen.sent_in[seen.batch == b][0])] if b in graded else None for b in range(len(seen.params))]
    reading = label_attacks(tails[-1], seen.rows, seen.grads, seen.positions, 3, 1.0, seen.graded, of_round,
                            seen.batch)["gradient"]
    assert labels["gradient_broadcast_tail"] == share(reading) and set(seen.sent_in[seen.graded].tolist()) == {1}


def test_a_whole_run_audit_attacks_every_send_the_victim_makes_with_the_params_it_was_made_with(gray, tmp_path, capsys):
    """--sends run replays the run and attacks every send of the victim's: each kept sample's two a round in every
    round (here both, every sample kept), averaged, so the noise left is half one round's; the replay ends
    where the run did; with a probe round, every sample's probe send is attacked too, and a sample no gradient was
    received for keeps its label-free guess (the gradient's own share is then stated where it was received)."""
    from dataclasses import replace

    config = audit_config(gray, tmp_path, rounds=2, probe_rounds=0, keep_ratio=1.0, clip_norm=5.0,
                          noise_multiplier=0.5, out=str(tmp_path / "run"))
    run(config, progress=False, log=lambda _: None)
    one = run_audit(config.replace(out=str(tmp_path / "one")), QUICK, progress=False, log=lambda _: None)
    main(["audit", "--from", str(tmp_path / "run"), "--sends", "run", "--images", "12", "--aux-samples", "60",
          "--gallery", "12", "--steps", "40", "--inversion-epochs", "3", "--no-progress"])
    every = json.loads((tmp_path / "run" / "audit.json").read_text())
    lines = capsys.readouterr().err.splitlines()
    assert (one["sends"], one["rounds_witnessed"], one["sends_per_image_range"]) == ("round", 1, [2, 2])
    assert (every["sends"], every["rounds_witnessed"], every["sends_per_image_range"]) == ("run", 2, [4, 4])
    assert any("the replay ends at" in line and "exactly" in line for line in lines) and every["replay"] == "exact"
    assert every["reconstruction"]["affine"]["psnr"] > one["reconstruction"]["affine"]["psnr"] + 1  # twice the sends
    assert every["labels"]["gradient"] >= 0.9 and "samples_with_gradient" not in every["labels"]

    probed = run_audit(audit_config(gray, tmp_path, rounds=2, out=str(tmp_path / "probed")), replace(QUICK, sends="run"),
                       progress=False, log=lambda _: None)
    assert probed["sends_per_image_range"] == [1, 3]  # the probe's one send; and two in its own round when kept
    labels = probed["labels"]
    assert labels["samples"] == 36 > labels["samples_with_gradient"] and labels["gradient_where_received"] >= 0.9


@pytest.mark.parametrize("prompt_updates", ["backprop", "forward-only"])
def test_over_a_whole_run_the_final_model_is_a_label_free_guess_and_a_prior(gray, tmp_path, prompt_updates,
                                                                             monkeypatch):
    """A run closing with a refit round sends every sample once more with the final prompts: the final model's
    guess reads those rows through the final tail, which is what the final model predicts from the victim's own
    images. It is a label-free guess beside the uploaded tail's (the advantage is over the better one), and the
    attacks run again with it as their prior."""
    from sfprompt import audit
    from sfprompt.audit import _label_accuracy

    fed, seen, final, upload, ids, truth = witnessed_run(gray, tmp_path, rounds=3, prompt_updates=prompt_updates,
                                                         perturbation=0.3)
    assert (fed.config.probe_rounds, fed.config.refit_rounds) == (1, 1)
    labels, samples = _label_accuracy(fed, 0, upload, seen, aggregated=False, final=final.cpu())
    with torch.no_grad():
        predicted = fed.model.logits(torch.stack([seen.images[int(p)] for p in ids]), final).argmax(1)
    assert samples == len(ids) == 36 and labels["final_model"] == float((predicted == truth).float().mean())
    assert labels["best_label_free"] == max(labels["label_free"], labels["final_model"])
    assert labels["advantage"] == labels["best_attack"] - labels["best_label_free"]
    attacks = {"backprop": "gradient_final_prior", "forward-only": "trajectory_final_prior"}
    assert attacks[prompt_updates] in labels and labels["best_attack"] >= labels[attacks[prompt_updates]]
    one_round, _ = _label_accuracy(fed, 0, upload, seen, aggregated=False)  # one round's: the broadcast model's
    assert "final_model" not in one_round and attacks[prompt_updates].replace("final", "broadcast") in one_round
    assert one_round["best_label_free"] == max(one_round["label_free"], one_round["broadcast_model"])
    # the attacks do start from the final model's guess: from one sure of every label, the trajectory keeps them
    # all, and the gradient attack keeps those of the samples no gradient was sent for
    sure = torch.full((len(ids), 3), -1e4).scatter_(1, truth[:, None], 0.0)
    monkeypatch.setattr(audit, "_final_model_scores", lambda final, seen: sure)
    labels, _ = _label_accuracy(fed, 0, upload, seen, aggregated=False, final=final.cpu())
    if prompt_updates == "forward-only":
        assert labels["trajectory_final_prior"] == labels["trajectory_replayed_tail"] == 1.0 > labels["trajectory"]
    else:
        sent = labels["samples_with_gradient"]
        right = labels["gradient_where_received"] * sent + len(ids) - sent
        assert labels["gradient_final_prior"] == pytest.approx(right / len(ids)) and sent < len(ids)


@pytest.mark.parametrize("prompt_updates", ["backprop", "forward-only"])
def test_under_label_dp_the_final_models_guess_weighs_the_randomized_labels(gray, tmp_path, prompt_updates,
                                                                         monkeypatch):
    """With --label-epsilon the messages show randomized labels: a server that knows the rate weighs each against
    the final model's guess (Bayes). A guess sure of every label outweighs them all; a weak one (the truth by 0.5
    nats, under the log(keep / flip) = 1 nat a shown label carries at epsilon 1 with 3 classes) outweighs none."""
    from sfprompt import audit
    from sfprompt.audit import _label_accuracy

    fed, seen, final, upload, ids, truth = witnessed_run(gray, tmp_path, rounds=3, prompt_updates=prompt_updates,
                                                         perturbation=0.3, label_epsilon=1.0)

    def attacked(margin: float) -> dict:  # the final model's guess: the truth, by `margin` nats over each other label
        scores = torch.zeros(len(ids), 3).scatter_(1, truth[:, None], margin)
        monkeypatch.setattr(audit, "_final_model_scores", lambda final, seen: scores)
        return _label_accuracy(fed, 0, upload, seen, aggregated=False, final=final.cpu())[0]

    attack = {"backprop": "gradient_final_prior", "forward-only": "trajectory_final_prior"}[prompt_updates]
    sure, weak = attacked(1e4), attacked(0.5)
    assert sure[attack] == 1.0 > weak[attack]  # the randomized labels shown are kept under the weak guess
    if prompt_updates == "backprop":  # where a gradient was sent its label stands, elsewhere the guess's
        sent = weak["samples_with_gradient"]
        right = weak["gradient_where_received"] * sent + len(ids) - sent
        assert weak[attack] == pytest.approx(right / len(ids)) and weak["gradient_where_received"] < 1


@pytest.mark.parametrize("proximal_mu, estimator", [(0.0, "antithetic"), (0.5, "antithetic"), (0.0, "residual")])
def test_the_server_replays_each_steps_tail_from_the_broadcast_and_the_rows_it_computed(gray, tmp_path, proximal_mu,
                                                                                        estimator):
    """At the client's labels, the tails the server replays (first-order steps from each round's broadcast on the
    rows the tail trains on: the unperturbed ones, residual's one perturbed set; the run's optimiser, FedProx's pull
    included) are the client's own: what the `trajectory_replayed_tail` attack lacks is only the labels."""
    from sfprompt.audit import _replayed_tails

    fed, seen, _, upload, ids, truth = witnessed_run(
        gray, tmp_path, rounds=2, probe_rounds=0, refit_rounds=0, prompt_updates="forward-only", perturbation=0.3,
        proximal_mu=proximal_mu, lr=0.01, aggregator="fedprox" if proximal_mu else "fedavg", estimator=estimator)
    tails = _replayed_tails(fed, seen, truth, ids, upload.tail)
    assert len(tails) == len(seen.evaluates) and len({e.round for e in seen.evaluates}) == 2
    for tail, e in zip(tails, seen.evaluates):
        for name, value in tail.state_dict().items():
            assert torch.allclose(value, e.tail[name], atol=1e-6), name
    wrong = _replayed_tails(fed, seen, (truth + 1) % 3, ids, upload.tail)[-1].state_dict()
    assert not all(torch.allclose(value, seen.evaluates[-1].tail[name], atol=1e-6) for name, value in wrong.items())


@pytest.mark.parametrize("prompt_updates", ["backprop", "forward-only"])
def test_in_one_round_the_broadcast_model_reads_the_victims_images_under_the_broadcast_prompts(gray, tmp_path,
                                                                                              prompt_updates):
    """Without client blocks the server can put the prompts it broadcast in place of those a send carries and run
    its body: the broadcast model's guess is what that model predicts from the victim's own images, however far the
    client's prompts moved in its round. With client blocks every row depends on the client's prompts, and with
    --train-body the model is not the frozen body's: no guess."""
    from sfprompt.audit import _broadcast_model_scores, _label_accuracy

    fed, seen, _, upload, ids, truth = witnessed_run(gray, tmp_path, rounds=1, probe_rounds=0, refit_rounds=0,
                                                     prompt_updates=prompt_updates, perturbation=0.3, prompt_lr=1.0)
    broadcast = fed.method.new_params(fed.model)
    broadcast.load_state_dict(seen.broadcasts[0])
    assert not torch.equal(torch.stack([p for p, _ in seen.params])[-1], broadcast.prompts)  # the prompts moved
    with torch.no_grad():
        expected = fed.model.logits(torch.stack([seen.images[int(p)] for p in ids]), broadcast).log_softmax(1)
    scores = _broadcast_model_scores(fed, 0, seen, upload.tail)
    assert torch.allclose(scores, expected, atol=1e-4)
    labels, _ = _label_accuracy(fed, 0, upload, seen, aggregated=True)
    assert labels["broadcast_model"] == float((expected.argmax(1) == truth).float().mean())
    assert labels["best_label_free"] == max(labels["label_free"], labels["broadcast_model"])
    blocks, seen_blocks, *_ = witnessed_run(gray, tmp_path, rounds=1, probe_rounds=0, refit_rounds=0, client_blocks=1)
    assert _broadcast_model_scores(blocks, 0, seen_blocks, upload.tail) is None
    if prompt_updates == "backprop":  # nor where the server trains body copies: the frozen body is not the model
        trained, seen_trained, *_ = witnessed_run(gray, tmp_path, rounds=1, method="sfl", train_body=True)
        assert _broadcast_model_scores(trained, 0, seen_trained, upload.tail) is None


def test_the_final_models_guess_averages_the_sends_made_with_its_prompts_else_all():
    """Each sample's final-model scores come from its sends made with the final prompts (a refit round's), averaged,
    or from all its sends where it made none with them (a run without a refit round)."""
    from types import SimpleNamespace

    from sfprompt.audit import _final_model_scores

    final = SimpleNamespace(prompts=torch.ones(1, 2, 3), tail=lambda rows: rows[:, 0])  # the rows' first, as logits
    rows = torch.randn(5, 1, 3)
    seen = SimpleNamespace(params=[(torch.zeros(1, 2, 3), {}), (torch.ones(1, 2, 3), {})],
                           batch=torch.tensor([0, 0, 0, 1, 1]), positions=torch.tensor([0, 1, 1, 0, 0]), rows=rows)
    scores = _final_model_scores(final, seen)
    logs = rows[:, 0].log_softmax(dim=1)
    assert torch.allclose(scores[0], (logs[3] + logs[4]) / 2)  # its two sends with the final prompts
    assert torch.allclose(scores[1], (logs[1] + logs[2]) / 2)  # none with them: both of its sends


def test_a_whole_run_audit_of_a_victim_never_sampled_is_refused(gray, tmp_path):
    import numpy as np

    from dataclasses import replace

    config = audit_config(gray, tmp_path, clients=4, clients_per_round=1, rounds=2, probe_rounds=0)
    rng = np.random.default_rng(config.seed)  # the clients a run samples, one a round
    sampled = {int(rng.choice(4, 1, replace=False)[0]) for _ in range(2)}
    never = min(set(range(4)) - sampled)
    with pytest.raises(ConfigError, match=f"client {never} finished none of the run's rounds"):
        run_audit(config, replace(QUICK, sends="run", victim=never), progress=False, log=lambda _: None)


def test_the_replay_check_compares_every_saved_tensor_an_empty_one_included(tmp_path):
    """A linear probe's prompts are an empty tensor: the check says exact or not without failing on it."""
    from safetensors.torch import save_file

    from sfprompt.audit import _check_replay

    final = torch.nn.Module()
    final.register_buffer("prompts", torch.zeros(1, 0, 4))
    final.register_buffer("weight", torch.ones(3))
    save_file({"prompts": torch.zeros(1, 0, 4), "weight": torch.ones(3), "body.x": torch.ones(1)},
              str(tmp_path / "global.safetensors"))
    lines = []
    assert _check_replay(final, tmp_path, lines.append) == "exact"
    final.weight[1] = 2.0
    assert _check_replay(final, tmp_path, lines.append) == "differs"
    assert "exactly" in lines[0] and "largest difference 1" in lines[1]


def test_a_run_kept_without_its_params_is_checked_round_by_round(tmp_path):
    """A benchmark's run is kept without its weights: the replay is checked by each round's accuracy and loss, as
    its metrics.jsonl has them (another CPU's float rounding shows there within a round or two)."""
    from sfprompt.audit import _check_replay

    ran = [{"round": 1, "accuracy": 0.5, "loss": 1.25}, {"round": 2, "accuracy": 0.75, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ran))
    lines = []
    assert _check_replay(torch.nn.Module(), tmp_path, lines.append, [dict(r) for r in ran]) == "same metrics"
    replayed = [ran[0], {"round": 2, "accuracy": 0.75, "loss": 0.5000001}]
    assert _check_replay(torch.nn.Module(), tmp_path, lines.append, replayed) == "differs"
    assert _check_replay(torch.nn.Module(), tmp_path, lines.append, ran[:1]) == "differs"  # a round short
    assert "every round" in lines[0]
    assert "round 2's accuracy and loss: (0.75, 0.5000001) against (0.75, 0.5)" in lines[1]
    assert "round 2's accuracy and loss: none against (0.75, 0.5)" in lines[2]
    unevaluated = [ran[0], {"round": 2, "accuracy": None, "loss": None}]  # a round one of them did not evaluate
    assert _check_replay(torch.nn.Module(), tmp_path, lines.append, unevaluated) == "same metrics"
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ran[0]) + "\n{\"round\": 2, \"accur")  # cut short
    assert _check_replay(torch.nn.Module(), tmp_path, lines.append, ran) == "unchecked"
    (tmp_path / "metrics.jsonl").unlink()
    assert _check_replay(torch.nn.Module(), tmp_path, lines.append, ran) == "unchecked"


def test_forward_only_direction_seeds_leave_the_noise_stream_alone(gray, tmp_path):
    """The direction seeds travel in the clear; a Mersenne Twister's outputs are linear in its state, so where the
    defence draws noise from the client's private stream, the seeds come from a stream of their own (without
    noise, from the private stream, as the published forward-only runs drew them)."""
    from sfprompt.audit import _trained, witness
    from sfprompt.federation import prepare
    from sfprompt.seeds import DIRECTIONS, client_seed, private_generator
    from sfprompt.zeroth_order import SEED_LIMIT

    for noise, salt in (({}, ()), ({"clip_norm": 5.0, "noise_multiplier": 0.5}, (DIRECTIONS,))):
        config = audit_config(gray, tmp_path, prompt_updates="forward-only", directions=2, perturbation=0.3,
                              out=str(tmp_path / f"seeds-{bool(noise)}"), **noise)
        fed = prepare(config)
        seen = witness(fed, *_trained(fed, None, 0, lambda _: None), victim=0)
        stream = private_generator(fed.clients[0].noise_seed, client_seed(config.seed, 1, 0), *salt)
        assert [e.seed for e in seen.evaluates] == [int(torch.randint(SEED_LIMIT, (1,), generator=stream))
                                                    for _ in seen.evaluates]


def test_a_whole_run_audit_leaves_out_a_round_the_victim_is_dropped_in(gray, tmp_path, monkeypatch):
    """A victim that fails between a forward and its backward in its second round: that round's sends are left out
    (no gradient is paired with another round's rows), the others attacked, and the log says so."""
    from dataclasses import replace

    from sfprompt.client import Client

    send_grad, calls = Client._send_grad, []

    def failing(self, ctx, grad):
        if self.cid == 0:
            calls.append(1)
            if len(calls) == 13:  # round 2's third batch (ten a round: 36 samples, batches of 8, two epochs)
                raise RuntimeError("the victim's connection broke")
        return send_grad(self, ctx, grad)

    monkeypatch.setattr(Client, "_send_grad", failing)
    lines = []
    config = audit_config(gray, tmp_path, rounds=2, probe_rounds=0, keep_ratio=1.0)
    result = run_audit(config, replace(LABELS, sends="run"), progress=False, log=lines.append)
    assert result["rounds_witnessed"] == 1 and result["sends_per_image_range"] == [2, 2]
    assert any("client 0 was dropped in round 2" in line for line in lines)
    assert result["labels"]["gradient"] >= 0.9


def test_each_gradient_is_read_through_the_tail_that_computed_it():
    """Two batches whose tails differ by a permutation of the classes: read through its own tail every gradient names
    its label; read through one tail for both, the second batch's would name the permuted class. A sample no gradient
    was received for (a probe round's send only) keeps its label-free guess, and without randomized labels the
    guess with a prior is the gradient's."""
    from sfprompt.attacks import label_attacks

    generator = torch.Generator().manual_seed(0)
    first = torch.nn.Linear(8, 4)
    second = torch.nn.Linear(8, 4)
    with torch.no_grad():
        second.weight.copy_(first.weight[[1, 2, 3, 0]])
        second.bias.copy_(first.bias[[1, 2, 3, 0]])
    tails = [lambda rows, net=net: net(rows[:, 0]) for net in (first, second)]
    rows = torch.randn(10, 1, 8, generator=generator)
    sample = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 4])  # samples 0-3 twice, 4 in the probe only
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0])
    graded = torch.tensor([True] * 8 + [False] * 2)
    labels = torch.tensor([2, 0, 3, 1])
    grads = []
    for s in range(8):  # what each send's backward carries: the loss gradient at its rows, through its own tail
        at = rows[s : s + 1].clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(tails[int(batch[s])](at), labels[int(sample[s])][None]).backward()
        grads.append(at.grad[0])
    grads = torch.stack(grads)
    own = label_attacks(tails[0], rows, grads, sample, 4, 1.0, graded, tails, batch)
    assert torch.equal(own["gradient"][:4], labels) and own["gradient"][4] == own["label_free"][4]
    assert torch.equal(own["gradient_with_prior"], own["gradient"])
    one = label_attacks(tails[0], rows[4:8], grads[4:8], sample[4:8], 4, 1.0)  # the second batch through the first tail
    assert not torch.equal(one["gradient"], labels)


def test_a_sure_tails_tiny_or_zero_gradient_names_its_label():
    """A tail so confident that its probability of the label rounds to 1 sends a gradient of exactly zero, which points
    nowhere: the attack names the class whose loss gradient is the smallest (there, zero), not class 0 by default.
    A little less sure, it sends gradients so small that a cosine's norms underflow: their directions still count."""
    from sfprompt.attacks import label_attacks

    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Linear(8, 4)
    with torch.no_grad():  # logit gaps of thousands: softmax is exactly one-hot in float32
        net.weight.copy_(torch.randn(4, 8, generator=generator) * 1e4)
        net.bias.zero_()
    tail = lambda rows: net(rows[:, 0])  # noqa: E731
    rows = torch.randn(12, 1, 8, generator=generator)
    labels = tail(rows).argmax(dim=1)
    at = rows.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(tail(at), labels).backward()
    assert (at.grad == 0).all() and len(labels.unique()) > 1
    guesses = label_attacks(tail, rows, at.grad, torch.arange(12), 4, 1.0)
    assert torch.equal(guesses["gradient"], labels)
    with torch.no_grad():  # logit gaps of tens: gradients of 1e-20 and below, whose norms' product underflows
        net.weight.mul_(5e-3)
    at = rows.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(tail(at), labels).backward()
    norms = at.grad.flatten(1).norm(dim=1)
    assert ((norms > 0) & (norms < 1e-12)).sum() >= 3 and torch.equal(tail(rows).argmax(dim=1), labels)
    assert torch.equal(label_attacks(tail, rows, at.grad, torch.arange(12), 4, 1.0)["gradient"], labels)


def test_the_white_box_attack_matches_each_send_through_the_prompts_it_was_made_with():
    """Sends of one image made with different prompts (the path depends on them where client blocks run): matched
    each through its own, the pixels are found; through one set of prompts for all, they are not."""
    from sfprompt.attacks import optimisation_attack

    class Path:  # a sending path that depends on the prompts: tanh(pixels x the prompts' scale)
        prompts = torch.full((1, 1, 1), 0.5)

        def clean(self, pixels, prompts=None):
            scale = (self.prompts if prompts is None else prompts).reshape(-1, 1)
            return torch.tanh(pixels.flatten(1) * scale)

        def features(self, tokens):
            return tokens

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 4, 4, generator=generator) * 0.8 + 0.1
    image = torch.tensor([0, 0, 1, 1])
    prompts = torch.tensor([0.5, 2.0, 0.5, 3.0]).view(-1, 1, 1)
    sends = Path().clean(images[image], prompts)
    found = optimisation_attack(Path(), sends, torch.full((1, 4, 4), 0.5), 300, False, image, prompts)
    assert (found - images).abs().max() < 0.02
    blind = optimisation_attack(Path(), sends, torch.full((1, 4, 4), 0.5), 300, False, image, None)
    assert (blind - images).abs().max() > 0.1
