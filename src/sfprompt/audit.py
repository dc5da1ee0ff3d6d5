"""`sfprompt audit`: what an honest-but-curious server recovers from a client's real messages.

One client (the victim) runs a real round of the configured method, with the run's global params
(those its method's own rounds start from, after any probe rounds it opens with, which the audit plays
first; or a finished run's with `--from DIR`), through the real client code and the real
body server; or, with `--sends run`, the whole run is played again as `run` plays it and the victim's
messages of every round it is sampled in are taken, each send with the params it was made with. Every
request the server receives and every reply is recorded, as is which of the client's samples each batch held
(the ground truth, which the attacks never see). Then the attacks
of `attacks.py` run on those messages, with auxiliary images from the dataset's test split (which no
client holds), and are scored against the originals:

- reconstruction, per image: PSNR and SSIM on [0, 1] pixels (torchmetrics) and re-identification:
  whether the reconstruction's nearest image (pixel distance) among the original and `gallery - 1`
  other training images of its class (none of them auxiliary data) is the original (chance
  1 / gallery). `best` takes, per image, the best PSNR and SSIM of any attack and counts it
  re-identified if any attack re-identifies it: an upper bound on what the server can choose.
- the class-mean image of the auxiliary data (of the image's true class): what the server gets with
  no attack at all.
- labels: the server's label-free prediction from the activations (over one round, also the broadcast
  model's on the victim's images, and over a whole run the final model's, which the server holds at its
  end), and inference from the `backward` gradients
  (see `attacks.label_attacks`), or, with forward-only prompt updates, from the prompts' trajectory
  (see `trajectory`), each from either guess.

The attacker is given which of the sends belong to the same image (so it averages repeated sends),
which it would otherwise have to work out: the audit errs on the attacker's side.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from . import attacks, checkpoint, trajectory
from .client import PROBE_STATE, Client
from .codec import Message, encode
from .config import Config, ConfigError
from .data import Transformed, stratified_subset
from .defence import local_epsilon, releases
from .federation import Federation, prepare
from .inprocess import InProcessRuntime, client_round
from .meter import DOWN, UP, PeakMemory
from .optim import build_optimizer
from .runner import play_rounds
from .runs import own_folder
from .seeds import client_seed
from .server import BodyServer
from .transport import InProcessLink, encode_held


@dataclass(frozen=True)
class AuditOptions:
    victim: int = 0  # the client whose messages are attacked
    images: int = 100  # how many of the images it sent are reconstructed
    aux_samples: int = 4000  # auxiliary images (from the test split) the attacker trains on
    gallery: int = 100  # re-identification candidates per image: the original and others of its class
    steps: int = 300  # white-box optimisation steps
    inversion_epochs: int = 30  # epochs of the learned inversion network
    seed: int = 0  # the attacker's own randomness and choice of gallery
    sends: str = "round"  # "round": the victim's sends in one round; "run": every send it makes in the whole run
    uploads: str = "seen"  # "seen": the server holds each client's upload; "aggregated": their sum only (SecAgg+)

    def check(self, config: Config) -> None:
        for name in ("images", "aux_samples", "steps", "inversion_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gallery < 2:
            raise ConfigError(f"--gallery must be at least 2 (the original and one other image), got {self.gallery}")
        if self.sends not in ("round", "run"):
            raise ConfigError(f"--sends must be round or run, got {self.sends!r}")
        if self.uploads not in ("seen", "aggregated"):
            raise ConfigError(f"--uploads must be seen or aggregated, got {self.uploads!r}")
        if not 0 <= self.victim < config.clients:
            raise ConfigError(f"--victim must be a client id between 0 and {config.clients - 1}, got {self.victim}")
        if config.method in ("fl", "fl-prompt"):
            raise ConfigError(f"--method {config.method} sends no activations or gradients, only whole-model or "
                              "prompt uploads; the audit attacks the split methods (sfprompt, sfl, sl)")
        if self.uploads == "aggregated":  # what Flower's SecAgg+ refuses, the audit does not pretend to run
            from .flower.settings import check_secure_aggregation

            try:
                check_secure_aggregation(config, clipping_range=math.inf)
            except ConfigError as err:
                raise ConfigError(f"--uploads aggregated: {err}") from err


class _Wiretap(InProcessLink):
    """The in-process link, also keeping every split request as the server received it, with its reply."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.exchanges: list[tuple[Message, Message]] = []

    def request(self, message: Message, phase: str, memory: PeakMemory | None = None) -> Message:
        received = self.deliver(encode_held(message, memory), UP, phase)
        reply = self.server.handle(received)
        self.exchanges.append((received, reply))
        return self.deliver(encode(reply), DOWN, phase, memory)


class _WitnessedClient(Client):
    """A client whose sent batches are noted (positions, labels, images) with the params each was sent with (the
    prompts and the tail its gradient or losses came from), the labels each forward-only step took its losses at,
    and the broadcast each of its rounds started from: the ground truth."""

    batches: list[list[torch.Tensor]]
    params: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]  # (prompts, tail state) of each batch in `batches`
    shown: list[torch.Tensor]
    broadcasts: list[dict[str, torch.Tensor]]  # each round's, in order
    sent_in: list[int]  # the round (an index in `broadcasts`) each batch in `batches` was sent in

    def run_round(self, method, global_state, *args, **kwargs):
        self.broadcasts.append({name: t.detach().cpu().clone() for name, t in global_state.tensors.items()})
        return super().run_round(method, global_state, *args, **kwargs)

    def _shown_labels(self, labels, positions, memory):
        shown = super()._shown_labels(labels, positions, memory)
        if self.settings.prompt_updates == "forward-only":  # one a step
            self.shown.append(shown.detach().cpu())
        return shown

    def _head_tokens(self, ctx, images, prompts):  # each sent batch's params: the prompts it was sent with (with
        # blocks, residual's perturbed set) and the tail as it was
        if ctx.phase in ("split", "probe"):
            tail = {name: t.detach().cpu().clone() for name, t in ctx.params.tail.state_dict().items()}
            self.params.append((prompts.detach().cpu().clone(), tail))
        return super()._head_tokens(ctx, images, prompts)

    def _loader(self, data, ctx, shuffle=True):
        for batch in super()._loader(data, ctx, shuffle):
            if ctx.phase in ("split", "probe"):  # what is sent: split training's batches, or the probe's
                self.batches.append([t.detach().cpu() for t in batch])
                self.sent_in.append(len(self.broadcasts) - 1)
            yield batch


@dataclass
class Evaluated:
    """One `evaluate` as the server received it, with what it returned, and the tail the client's losses used."""

    prompts: torch.Tensor  # (P, D): the prompts as they were sent
    seed: int  # of the directions
    rows: torch.Tensor  # (S, B, R, D): the rows of every prompt set
    tail: dict[str, torch.Tensor]  # the ground truth (an upper bound on what the server knows)
    shown: torch.Tensor  # (B,): the labels its losses were taken at (the true ones, or --label-epsilon's)
    positions: torch.Tensor  # (B,): which of the victim's samples it held (never shown to the attacks)
    round: int  # which of the victim's rounds it was sent in, in order (an index in `Witnessed.broadcasts`)


@dataclass
class Witnessed:
    """A victim's round as the server saw it, with the ground truth beside it."""

    tokens: torch.Tensor  # (S, L, D): every forward's activations, one row per send
    rows: torch.Tensor  # (S, R, D): the body output the server returned for each send
    grads: torch.Tensor  # (G, R, D): the backward gradient received for each send `graded` marks, in order
    graded: torch.Tensor  # (S,): which sends a backward followed (none: a probe's or forward-only's)
    batch: torch.Tensor  # (S,): the index in `params` of the batch each send was in
    sent_in: torch.Tensor  # (S,): the round (an index in `broadcasts`) each send was made in
    params: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]  # each batch's prompts and tail, as the client sent it
    evaluates: list[Evaluated]  # forward-only's steps, in order (empty: the other methods send none, and with client
    # blocks no step's prompts or seed travel)
    positions: torch.Tensor  # (S,): which of the victim's samples each send was (never shown to the attacks)
    labels: torch.Tensor  # (S,)
    images: dict[int, torch.Tensor]  # position -> the model input it came from
    upload: Message  # the victim's last upload in a round of the method's own
    broadcasts: list[dict[str, torch.Tensor]]  # the global params each of the victim's rounds started from

    @property
    def rounds(self) -> int:
        """How many rounds of the victim's the sends come from."""
        return len(self.broadcasts)


def _witnessed_client(fed: Federation, victim: int) -> _WitnessedClient:
    """The victim as the run has it (the same data, model and secrets), its sends and their params noted."""
    original = fed.clients[victim]
    client = _WitnessedClient(victim, original.data.dataset, np.asarray(original.data.indices), original.model,
                              fed.settings, fed.meter, fed.device, original.private_seed, fed.config.seed,
                              original.noise_seed)
    client.batches, client.params, client.shown, client.broadcasts, client.sent_in = [], [], [], [], []
    return client


def witness(fed: Federation, global_params: torch.nn.Module, kept: dict | None, victim: int) -> Witnessed:
    """Run the victim's round for real and record what the server receives."""
    client = _witnessed_client(fed, victim)
    if kept is not None:  # what it kept from the run, but its probe statistics: the audit attacks the send behind them
        client.load_state_dict({name: t for name, t in kept.items() if not name.startswith(PROBE_STATE)})
    server = BodyServer(fed.model, fed.meter, fed.device)
    link = _Wiretap(server, fed.meter, fed.device)
    upload = client_round(link, client, fed.method, global_params, client_seed(fed.config.seed, 1, victim))
    fed.meter.take()
    return _witnessed(client, link.exchanges, upload)


class _TappedRuntime(InProcessRuntime):
    """The in-process runtime with the victim witnessed and its link tapped, keeping its last upload in a round of
    the method's own (not the probe rounds it may open with). A round the victim is dropped in is left out whole
    (what it noted and sent there: a failure can come between a batch noted and sent, or a forward and its
    backward), and named in `dropped`."""

    def __init__(self, fed: Federation, client: _WitnessedClient) -> None:
        super().__init__(fed, progress=False)
        self.victim = client
        self.tap = _Wiretap(self.server, fed.meter, fed.device, fed.max_message_bytes)
        self.upload: Message | None = None
        self.dropped: list[int] = []
        fed.clients[client.cid] = client

    def link_for(self, cid: int) -> InProcessLink:
        return self.tap if cid == self.victim.cid else self.link

    def train(self, round_: int, cids: list[int], global_params: torch.nn.Module):
        victim, fed = self.victim, self.federation
        notes = [victim.batches, victim.params, victim.sent_in, victim.shown, victim.broadcasts, self.tap.exchanges]
        before = [len(note) for note in notes]
        updates, dropped = super().train(round_, cids, global_params)
        if any(failure["client"] == victim.cid for failure in dropped):
            for note, length in zip(notes, before):
                del note[length:]
            self.dropped.append(round_)
        elif fed.method.stage(round_, fed.config) is fed.method:
            self.upload = next((u for u in updates if u.meta["client"] == victim.cid), self.upload)
        return updates, dropped


def witness_run(fed: Federation, victim: int, log: Callable[[str], None],
                records: list[dict] | None = None) -> tuple[Witnessed, torch.nn.Module]:
    """Play the whole run as `sfprompt run` does (the same clients sampled, the same seeds) and record everything
    the server receives from the victim, in every round it is sampled in, its probe rounds' sends included; with
    the run's final global params (and each round's metrics record appended to `records`, if given)."""
    runtime = _TappedRuntime(fed, _witnessed_client(fed, victim))
    final = play_rounds(fed, runtime, log, fed.config.rounds, records)
    fed.meter.take()
    if runtime.dropped:
        rounds = ", ".join(map(str, runtime.dropped))
        log(f"client {victim} was dropped in round {rounds}: its sends there are left out")
    if runtime.upload is None:
        raise ConfigError(f"client {victim} finished none of the run's rounds of {fed.method.name} (its probe rounds "
                          "aside): it was not sampled in any, or was dropped in every one; choose another --victim")
    return _witnessed(runtime.victim, runtime.tap.exchanges, runtime.upload), final


def _witnessed(client: _WitnessedClient, exchanges: list[tuple[Message, Message]], upload: Message) -> Witnessed:
    """What the server received from `client` (its requests and their replies, in order), decoded as the server
    decodes it, with the ground truth the client noted beside it."""
    forwards = [(request, reply) for request, reply in exchanges if request.kind in ("forward", "features", "evaluate")]
    backwards = [request for request, _ in exchanges if request.kind == "backward"]
    if len(forwards) != len(client.batches):
        raise AssertionError(f"the victim sent {len(forwards)} batches but noted {len(client.batches)}: the audit "
                             "would pair sends with the wrong samples")
    images = {}
    for batch in client.batches:
        for image, position in zip(batch[0], batch[2].tolist()):
            images[position] = image
    cat = lambda parts: torch.cat([p.detach().cpu() for p in parts])  # noqa: E731
    messages = client.model.messages  # what the server decodes, in the victim's wire format
    tokens = [messages.unpack_tokens(request.tensors) for request, _ in forwards]
    sets = messages.perturbations.sets if messages.perturbations is not None else 1
    rows = [messages.unpack_rows(reply.tensors, len(t) * (sets if request.kind == "evaluate" else 1))
            .view(-1, len(t), *messages.tail_shape) for t, (request, reply) in zip(tokens, forwards)]  # (sets, B, R, D)
    graded = [request.kind == "forward" for request, _ in forwards]  # a backward follows each forward, in order
    grads = [messages.unpack_grad(request.tensors, tuple(r.shape[1:]))
             for r, request in zip([r for r, g in zip(rows, graded) if g], backwards, strict=True)]
    # the forward-only steps whose prompts and directions the server sees (with client blocks neither travels: the
    # prompts reach it only through the client's blocks, mixed with the images, and no seed is sent)
    evaluating = [b for b, (request, _) in enumerate(forwards) if request.kind == "evaluate"]
    evaluates = [Evaluated(tokens[b][0, messages.layout.prompt_rows], forwards[b][0].meta["directions-seed"], rows[b],
                           client.params[b][1], shown, client.batches[b][2], client.sent_in[b])
                 for b, shown in zip(evaluating, client.shown, strict=True)] if messages.server_perturbs else []
    sizes = torch.tensor([len(t) for t in tokens])
    return Witnessed(cat(tokens), cat([r[0] for r in rows]), cat(grads) if grads else torch.empty(0),
                     torch.repeat_interleave(torch.tensor(graded, dtype=torch.bool), sizes),
                     torch.repeat_interleave(torch.arange(len(tokens)), sizes),
                     torch.repeat_interleave(torch.tensor(client.sent_in, dtype=torch.long), sizes), client.params,
                     evaluates, cat([b[2] for b in client.batches]), cat([b[1] for b in client.batches]), images,
                     upload, client.broadcasts)


def run_audit(config: Config, options: AuditOptions, from_dir: Path | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict:
    """Attack the victim's messages; write `audit.json` and `audit.png` to `config.out`; return the figures."""
    log = log or (lambda line: tqdm.write(line, file=sys.stderr))
    started = time.perf_counter()
    options.check(config)
    config = own_folder(config, "audit")
    fed = prepare(config)
    opening = config.probe_rounds
    if options.sends == "run":
        params = f"every send of the run{f' of {from_dir}' if from_dir else ''}, replayed from its start"
    else:
        params = (f"params of {from_dir}" if from_dir else
                  f"params after its {opening} probe round{'s' * (opening > 1)}" if opening else "initial params")
    log(f"audit of {config.method} ({fed.description}): client {options.victim}'s messages, {params}")
    final = None  # the run's final global params, which the server holds (a whole run's audit only)
    replay = None  # whether a finished run's replay is that run
    if options.sends == "run":
        records = []
        seen, final = witness_run(fed, options.victim, log, records)
        if from_dir is not None:
            replay = _check_replay(final, from_dir, log, records)
        final = final.cpu()
    else:
        seen = witness(fed, *_trained(fed, from_dir, options.victim, log), victim=options.victim)
    fed.model.to(torch.device("cpu"))

    mean, std = fed.normalisation["mean"], fed.normalisation["std"]
    to_pixels = lambda x: (x.cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).clamp(0, 1)  # noqa: E731
    aux, aux_labels = _auxiliary(fed, options, to_pixels, progress)
    channels = aux.shape[1]

    upload = fed.method.new_params(fed.model)
    upload.load_state_dict({k: v.cpu() for k, v in seen.upload.tensors.items()})
    upload.eval().requires_grad_(False)
    # The server knows where each client's head ends (it admitted it there): the attack simulates that head, with
    # the victim's uploaded prompts, or under secure aggregation the newest it broadcast to it.
    aggregated = options.uploads == "aggregated"
    prompts = seen.broadcasts[-1]["prompts"] if aggregated else upload.prompts
    sim = attacks.Simulator(fed.clients[options.victim].model, prompts, mean, std, channels)
    defence = fed.model.defence
    if defence.shuffle:
        sim.unshuffler = attacks.Unshuffler.fit(sim, aux)

    # The images attacked: the first `images` distinct samples the victim sent, each with all its sends (averaged:
    # without client blocks a sample's sent rows are the same whatever the prompts, up to the noise).
    chosen = seen.positions.unique()[: options.images]
    counts = torch.stack([(seen.positions == p).sum() for p in chosen])
    sends = int(counts.median())
    with torch.no_grad():
        received = sim.received(seen.tokens)  # (S, features)
    observed = torch.stack([received[seen.positions == p].mean(0) for p in chosen])
    originals = torch.stack([to_pixels(seen.images[int(p)])[:channels] for p in chosen])
    labels = torch.stack([seen.labels[seen.positions == p][0] for p in chosen])
    class_means = torch.stack([aux[aux_labels == c].mean(0) for c in range(fed.model.num_classes)])
    per_send = None
    if options.sends == "run" and sim.model.client_blocks:  # each send through the prompts it was made with
        sent = torch.isin(seen.positions, chosen)
        prompts = torch.cat([seen.params[b][0] for b in seen.batch[sent].tolist()])  # (S', P, D)
        per_send = (received[sent], torch.searchsorted(chosen, seen.positions[sent]), prompts)
    reconstructions, skipped = _reconstruct(sim, observed, aux, defence.noise_std**2 / counts.double(), sends,
                                            options, progress, per_send)
    reconstructions = {"class_mean": class_means[labels], **reconstructions}

    candidates = _gallery(fed, chosen, seen, options, to_pixels, channels)
    scores, reconstruction = _scored(reconstructions, originals, candidates)
    reconstruction |= {name: {"skipped": why} for name, why in skipped.items()}

    label_accuracy, samples_sent = _label_accuracy(fed, options.victim, upload, seen, aggregated, final)

    per_sample = releases(config)
    epsilon = local_epsilon(defence.noise_multiplier, per_sample, config.dp_delta)
    result = {
        "config": config.to_dict(),
        "audit": asdict(options),
        "params": str(from_dir) if from_dir else params,
        **({"replay": replay} if replay else {}),
        "victim_client_blocks": fed.clients[options.victim].model.client_blocks,  # its split point
        "images_attacked": len(chosen),
        "sends": options.sends,
        "rounds_witnessed": seen.rounds,
        "sends_per_image": sends,  # the median; each image's sends are all attacked
        "sends_per_image_range": [int(counts.min()), int(counts.max())],
        "samples_sent": samples_sent,
        "gallery": options.gallery,
        "chance_reidentification": 1 / options.gallery,
        "aux_images": len(aux),
        "pixels": f"{channels} x {aux.shape[2]} x {aux.shape[3]} in [0, 1]",
        "activation_privacy": {
            "noise_std": defence.noise_std, "releases_per_sample": per_sample, "delta": config.dp_delta,
            "epsilon": epsilon if math.isfinite(epsilon) else None,  # None: no noise, no guarantee
        },
        "label_privacy": {"epsilon": defence.label_epsilon,
                          "keep_probability": defence.keep_probability(fed.model.num_classes)},
        "reconstruction": reconstruction,
        "labels": {"samples": samples_sent, **label_accuracy},
        "seconds": time.perf_counter() - started,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    _picture(out / "audit.png", originals, reconstructions, scores)
    log(summary_line(result) + f"; results in {out / 'audit.json'}")
    return result


def _trained(fed: Federation, from_dir: Path | None, victim: int,
             log: Callable[[str], None]) -> tuple[torch.nn.Module, dict | None]:
    """The global parameters the victim's round starts from (a finished run's, from `from_dir`, else those its
    method's own rounds start from: after the probe rounds it opens with, played here) and what the victim kept
    privately in that run (`Client.state_dict`), if it checkpointed it. The attacked round is one of the method's
    own (the probe rounds' sends are the probe's: `--method linear-probe` audits those)."""
    if from_dir is None:
        return play_rounds(fed, InProcessRuntime(fed, progress=False), log), None
    saved, round_ = _saved_params(from_dir)
    round_ = fed.config.rounds if round_ is None else round_
    stage = fed.method.stage(round_, fed.config)  # a run stopped within its probe rounds saved the probe's state
    stage_params = stage.new_params(fed.model).to(fed.device)
    stage_params.load_state_dict(saved)
    global_params = fed.method.carry(fed.model, stage_params) if stage is not fed.method else stage_params
    kept = checkpoint.load(from_dir).clients.get(victim) if (from_dir / checkpoint.FILE).is_file() else None
    return global_params, kept


def _saved_params(folder: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """A run's saved global params but the frozen body's (global.safetensors), and the round they are from."""
    with safe_open(str(folder / "global.safetensors"), "pt") as file:
        round_ = (file.metadata() or {}).get("round")
        return ({name: file.get_tensor(name) for name in file.keys() if not name.startswith("body.")},
                None if round_ is None else int(round_))


def _check_replay(final: torch.nn.Module, from_dir: Path, log: Callable[[str], None],
                  records: list[dict] | None = None) -> str:
    """Say whether the replayed run ends where the run in `from_dir` ended (it does on the machine and versions that
    made it: a run repeats bit for bit), and return the verdict: "exact" or "differs" by its final params, or, for
    a run kept without them (a benchmark's, in the repo), by each round's accuracy and loss (`records`, the
    replay's, against its metrics.jsonl): "same metrics" or "differs"; "unchecked" if it keeps neither."""
    warning = "another machine or version; the audit attacks the replayed run"
    if not (from_dir / "global.safetensors").is_file():
        ran = _recorded_metrics(from_dir / "metrics.jsonl")
        if records is None or ran is None:
            log(f"{from_dir} keeps no final params or readable metrics to check the replay against")
            return "unchecked"
        replayed = [(r.get("accuracy"), r.get("loss")) for r in records]
        # a round one of them did not evaluate (a run resumed with other --rounds or --eval-every) is not compared
        parted = [i for i, (a, b) in enumerate(zip(replayed, ran)) if a != b and None not in (a[0], b[0])]
        if not parted and len(replayed) == len(ran):
            log(f"the replay's rounds end at {from_dir}'s accuracy and loss in every round (it keeps no final params)")
            return "same metrics"
        at = parted[0] if parted else min(len(replayed), len(ran))
        log(f"warning: the replay does not follow {from_dir}'s rounds (round {at + 1}'s accuracy and loss: "
            f"{_at(replayed, at)} against {_at(ran, at)}): {warning}")
        return "differs"
    saved, _ = _saved_params(from_dir)
    replayed = {name: t.detach().cpu() for name, t in final.state_dict().items() if name in saved}
    if replayed.keys() == saved.keys() and all(torch.equal(t, saved[name].to(t.dtype)) for name, t in replayed.items()):
        log(f"the replay ends at {from_dir}'s final params exactly")
        return "exact"
    gaps = [float((t.float() - saved[name].float()).abs().max()) for name, t in replayed.items()
            if t.numel() and t.shape == saved[name].shape]
    log(f"warning: the replay does not end at {from_dir}'s final params (largest difference "
        f"{max(gaps, default=math.nan):.3g}): {warning}")
    return "differs"


def _recorded_metrics(path: Path) -> list[tuple] | None:
    """Each round's (accuracy, loss) in a run's metrics.jsonl, or None without one that reads."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # none, or a line cut short
        return None
    return [(r.get("accuracy"), r.get("loss")) for r in records]


def _at(pairs: list[tuple], at: int) -> tuple | str:
    """The `at`-th round's pair, or "none" past the last."""
    return pairs[at] if at < len(pairs) else "none"


def _auxiliary(fed: Federation, options: AuditOptions, to_pixels: Callable,
               progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's own images (a class-stratified draw from the test split, never the victim's) as pixels in
    [0, 1], one channel when they are grayscale (which the attacker sees), and their labels."""
    data = Transformed(fed.data.test, fed.transform)
    index = stratified_subset(fed.data.test_labels, options.aux_samples, options.seed)
    aux = torch.stack([to_pixels(data[int(i)][0]) for i in tqdm(index, desc="audit: auxiliary images", leave=False,
                                                                 disable=not progress)])
    channels = 1 if float((aux - aux[:, :1]).abs().max()) < 1e-4 else aux.shape[1]
    return aux[:, :channels], torch.as_tensor(fed.data.test_labels[index])


def _reconstruct(sim: attacks.Simulator, observed: torch.Tensor, aux: torch.Tensor, noise_var: torch.Tensor,
                 sends: int, options: AuditOptions, progress: bool,
                 per_send: tuple[torch.Tensor, ...] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each attack's reconstructions of the observed images (each image's sends averaged, leaving `noise_var` of
    the noise, (B,)), and why an attack that cannot apply was skipped. `per_send`: every send's features, image
    and prompts, which the white-box optimisation then matches each through its own prompts; the learned
    inversion trains on `sends` sends averaged."""
    reconstructions, skipped = {}, {}
    estimate, why = attacks.affine_attack(sim, observed, aux, noise_var)
    if estimate is None:
        skipped["affine"] = why
    else:
        reconstructions["affine"] = estimate
    reconstructions["optimisation"] = attacks.optimisation_attack(sim, *(per_send[:1] if per_send else (observed,)),
                                                                  aux.mean(0), options.steps, progress,
                                                                  *(per_send[1:] if per_send else ()))
    reconstructions["learned"] = attacks.learned_attack(sim, observed, aux, sends, options.inversion_epochs,
                                                        torch.Generator().manual_seed(options.seed), progress)
    return reconstructions, skipped


def _scored(reconstructions: dict[str, torch.Tensor], originals: torch.Tensor,
            candidates: torch.Tensor) -> tuple[dict[str, dict], dict[str, dict]]:
    """Each reconstruction's per-image scores against the originals (and the re-identification gallery) and their
    summaries, with `best`: image by image, the best any attack reached (the class-mean image is a reference,
    not an attack)."""
    scores = {name: _scores(images, originals, candidates) for name, images in reconstructions.items()}
    attacks_only = [s for name, s in scores.items() if name != "class_mean"]
    best = {"psnr": torch.stack([s["psnr"] for s in attacks_only]).amax(0),
            "ssim": torch.stack([s["ssim"] for s in attacks_only]).amax(0),
            "reidentified": torch.stack([s["reidentified"] for s in attacks_only]).any(0)}
    return scores, {name: _summary(s) for name, s in scores.items()} | {"best": _summary(best)}


LABEL_FREE = ("label_free", "final_model", "broadcast_model")  # the server's guesses without the split-phase messages


def _label_accuracy(fed: Federation, victim: int, upload: torch.nn.Module, seen: Witnessed,
                    aggregated: bool, final: torch.nn.Module | None = None) -> tuple[dict[str, float], int]:
    """How often each label attack names the true label of a sample the victim sent, the best attack's advantage
    over the best guess without the messages, and how many samples it sent. The server's own guess, and the attacks'
    prior, read every send through the tail it holds for the victim: its uploaded tail, or under secure aggregation
    (`aggregated`) the newest tail it broadcast to it; then `upload_alone` is what the upload would have named by
    itself. The server also holds a global model it can read the victim's sends with: over a whole run (`final`: its
    final global params) the model the run ends with (`final_model`, see `_final_model_scores`), over one round the
    one it broadcast for it (`broadcast_model`, see `_broadcast_model_scores`; none with client blocks). Its guess
    is a second label-free guess, and a second prior for the attacks (their `*_final_prior` or `*_broadcast_prior`
    guesses). Each gradient is read through the tail that computed it
    (`gradient`: an upper bound, as forward-only's `trajectory` is; the client's tail moves with every step) and
    through the tail broadcast for its round (`gradient_broadcast_tail`, which the server holds either way).
    Without gradients, the attack reads the forward-only prompt trajectory, or a linear-probe client's uploaded
    statistics (none under secure aggregation)."""
    num_classes, defence, figures, uploaded = fed.model.num_classes, fed.model.defence, {}, {}
    ids = seen.positions.unique()
    truth = torch.stack([seen.labels[seen.positions == p][0] for p in ids])

    def guess_of(tail: torch.nn.Module) -> torch.Tensor:  # the server's label-free guess of each sample, through tail
        return attacks.per_sample(attacks.log_probs(tail, seen.rows), seen.positions).argmax(dim=1)

    held = _tail_of(upload.tail, _tail_state(seen.broadcasts[-1])) if aggregated else upload.tail
    held_model, model_scores = (("final", _final_model_scores(final, seen)) if final is not None else
                                ("broadcast", _broadcast_model_scores(fed, victim, seen, upload.tail)))
    if fed.clients[victim].model.perturbations is not None:  # forward-only steps
        guesses, figures = _trajectory_labels(fed, victim, upload, seen, truth, attacks.log_probs(held, seen.rows),
                                              model_scores, held_model)
    elif seen.graded.any():
        graded_batches = set(seen.batch[seen.graded].tolist())  # (the others' tails are never read)
        round_of = dict(zip(seen.batch.tolist(), seen.sent_in.tolist()))
        broadcast = _broadcast_tails(upload.tail, seen, set(round_of.values()))
        own, of_round = zip(*[(_tail_of(upload.tail, tail), broadcast[round_of[b]]) if b in graded_batches else
                              (None, None) for b, (_, tail) in enumerate(seen.params)])
        read = lambda tails: attacks.label_attacks(  # noqa: E731
            held, seen.rows, seen.grads, seen.positions, num_classes, defence.keep_probability(num_classes),
            seen.graded, tails, seen.batch)
        guesses = read(own)
        guesses["gradient_broadcast_tail"] = read(of_round)["gradient"]
        graded = seen.positions[seen.graded].unique()  # the samples a gradient was received for (all, in one round)
        where = torch.isin(ids, graded)
        if len(graded) < len(truth):  # the others (a probe round's only) keep their label-free guess
            figures = {"samples_with_gradient": len(graded),
                       "gradient_where_received": float((guesses["gradient"] == truth)[where].float().mean())}
        if model_scores is not None:  # the gradient's class beside the held model's guess, which the others keep
            shown = attacks.with_randomized_label(model_scores.log_softmax(dim=1), guesses["gradient"],
                                                  defence.keep_probability(num_classes))
            guesses[f"gradient_{held_model}_prior"] = torch.where(where, shown, model_scores.argmax(dim=1))
    else:  # a linear-probe client: its uploaded statistics name its labels, unless summed with others' first
        statistics = attacks.statistics_label_attacks(upload, seen.rows, seen.positions,
                                                      seen.upload.meta["num_examples"])
        uploaded = {name: guess for name, guess in statistics.items() if name != "label_free"}
        guesses = {"label_free": guess_of(held)} if aggregated else statistics
    if aggregated:  # what the upload the server no longer sees would have named by itself
        uploaded = uploaded or {"uploaded_tail": guess_of(upload.tail)}
        figures["upload_alone"] = max(float((guess == truth).float().mean()) for guess in uploaded.values())
    if model_scores is not None:
        guesses[f"{held_model}_model"] = model_scores.argmax(dim=1)
    accuracy = {name: float((guess == truth).float().mean()) for name, guess in guesses.items()}
    best_label_free = max(accuracy[name] for name in LABEL_FREE if name in accuracy)
    accuracy["best_attack"] = max((value for name, value in accuracy.items() if name not in LABEL_FREE),
                                  default=best_label_free)  # no attack applies: the guess without one
    accuracy["best_label_free"] = best_label_free
    accuracy["advantage"] = accuracy["best_attack"] - best_label_free
    return accuracy | figures, len(truth)


def _final_model_scores(final: torch.nn.Module, seen: Witnessed) -> torch.Tensor:
    """The log-probabilities (n, C) of each sample the victim sent under the run's final global model: its tail on the
    rows the server returned for the sends made with the final prompts (a closing refit round's, which send every
    sample with them), or, for a sample sent with none, on all of its sends' rows; averaged over those sends (they
    see one image: summed, a prior would count it once a send). A label-free guess the server holds at the end of
    any run (under secure aggregation too: the final model is the federation's output)."""
    prompts = final.prompts.detach().cpu()
    current = torch.tensor([torch.equal(sent, prompts) for sent, _ in seen.params])[seen.batch]  # (S,)
    scores = attacks.log_probs(final.tail, seen.rows)
    with_final, finals = _mean_per_sample(scores, seen.positions, current)
    return torch.where(finals[:, None] > 0, with_final, _mean_per_sample(scores, seen.positions)[0])


def _broadcast_model_scores(fed: Federation, victim: int, seen: Witnessed,
                            template: torch.nn.Module) -> torch.Tensor | None:
    """The log-probabilities (n, C) of each sample the victim sent under the global model the server broadcast for
    the round it was sent in, averaged over its sends: without client blocks a send's patch rows do not depend on
    the prompts, so the server puts the broadcast prompts in place of those sent, runs its body and reads the
    broadcast tail there (what that model predicts from the victim's own images, noise and all). A label-free guess
    the server holds in any round, under secure aggregation too. None with client blocks (every row then depends on
    the prompts that made it), where the server trains body copies (--train-body: the round's model is not the
    frozen body with the broadcast params) or for params without prompts. `template`: a tail of the victim's method."""
    split = fed.clients[victim].model
    if split.client_blocks or fed.config.train_body or any("prompts" not in params for params in seen.broadcasts):
        return None
    body, layout = fed.model.at(0).body, split.layout
    scores = torch.empty(len(seen.tokens), fed.model.num_classes)
    for round_, tail in _broadcast_tails(template, seen, seen.sent_in.unique().tolist()).items():
        in_round = seen.sent_in == round_
        tokens = seen.tokens[in_round]  # (a copy: the sends' own are kept)
        tokens[:, layout.prompt_rows] = seen.broadcasts[round_]["prompts"].reshape(-1, layout.width)
        with torch.no_grad():
            rows = torch.cat([body(chunk)[:, layout.tail_rows] for chunk in tokens.split(256)])
        scores[in_round] = attacks.log_probs(tail, rows)
    return _mean_per_sample(scores, seen.positions)[0]


def _mean_per_sample(scores: torch.Tensor, positions: torch.Tensor,
                     sends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-send `scores` (S, C) averaged over each sample's sends (those `sends` marks, all if None: a sample's
    sends see one image, so summed, a prior would count it once a send), one row per distinct position,
    ascending; and how many each averaged (0: none marked, its row 0)."""
    sends = torch.ones(len(scores), dtype=torch.bool) if sends is None else sends
    counts = attacks.per_sample(sends[:, None].float(), positions)
    summed = attacks.per_sample(torch.where(sends[:, None], scores, 0.0), positions)
    return summed / counts.clamp_min(1), counts[:, 0]


def _broadcast_tails(template: torch.nn.Module, seen: Witnessed, rounds) -> dict[int, torch.nn.Module]:
    """The tail each of the victim's `rounds` (indices in `seen.broadcasts`) started from, one copy a round."""
    return {r: _tail_of(template, _tail_state(seen.broadcasts[r])) for r in rounds}


def _tail_state(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tail's weights among a method's global params (a broadcast's `tail.*`)."""
    return {name.removeprefix("tail."): t for name, t in params.items() if name.startswith("tail.")}


def _trajectory_labels(fed: Federation, victim: int, upload: torch.nn.Module, seen: Witnessed,
                       truth: torch.Tensor, log_probs: torch.Tensor,
                       model_scores: torch.Tensor | None = None,
                       held_model: str = "final") -> tuple[dict[str, torch.Tensor], dict]:
    """Forward-only's label attacks (`trajectory`): the label-free guess (from each send's `log_probs`); the labels
    that explain the coefficients
    read from the prompt trajectory, with the losses of the tail each step used (`trajectory`: an upper bound) and
    of the tail the server broadcast (`trajectory_broadcast_tail`); and, step by step, what one step alone adds to
    the label-free guess of its batch (under Adam with the factor all steps gave). Under --label-epsilon the steps
    explain the randomized labels, so the attack infers those (their prior: the label-free guess through randomized
    response) and then, as a Bayesian attacker who knows the rate, each true label from its randomized one and the
    label-free guess. With the scores of a model the server holds (`model_scores`: a whole run's final model's, or
    one round's broadcast model's, as `held_model` names it), the search runs again from that guess, with it as the
    prior (`trajectory_final_prior` or `trajectory_broadcast_prior`). `trajectory_replayed_tail` needs no tail the
    server does not hold: from the held model's guess (else the label-free one) it replays each step's tail
    (`_replayed_tails`), searches with those, and replays again under what it found (`REPLAYS` times).
    `unexplained_at_truth` checks the attack's model of the steps: its residual at the labels the client's losses
    were taken at (the true ones, or the randomized ones)."""
    config, model, classes = fed.config, fed.clients[victim].model, fed.model.num_classes
    ids = seen.positions.unique()
    prior = attacks.per_sample(log_probs, seen.positions)
    guesses = {"label_free": prior.argmax(dim=1)}
    optimizer = trajectory.PromptOptimizer(config.optimizer, config.prompt_lr, config.momentum, config.weight_decay,
                                           config.proximal_mu)
    why_not = optimizer.why_not_invertible()
    perturbations, evaluates = model.perturbations, seen.evaluates
    estimator = perturbations.estimator
    unit = perturbations.directions * perturbations.size * (2 if estimator == "antithetic" else 1)
    # (evaluate, its coefficients, its round, the evaluate before it: residual's) of each step whose result the
    # round's next evaluate shows. A round's first residual step has nothing to compare its loss with and gives the
    # optimiser no gradient, which skips it (its step count too): its trajectory is read from its second.
    read = []
    for round_ in sorted({e.round for e in evaluates}):  # the optimiser starts anew each round, from its broadcast
        taken = [e for e in evaluates if e.round == round_]
        stepped = taken[1:] if estimator == "residual" else taken
        if len(stepped) > 1 and not why_not:
            anchor = seen.broadcasts[round_]["prompts"].reshape(taken[0].prompts.shape)
            coefficients = trajectory.step_coefficients([e.prompts for e in stepped], [
                perturbations.draw(e.seed, e.prompts.shape) for e in stepped], optimizer, anchor=anchor)
            before = taken if estimator == "residual" else [None] * len(stepped)
            read += [(e, c, round_, b) for e, c, b in zip(stepped, coefficients, before)]
    if not read:
        if not model.messages.server_perturbs:
            why_not = "with client blocks the prompts reach the server only through the client's blocks; no seed travels"
        return guesses, {"trajectory_skipped": why_not or "fewer than two steps a round: no step's result is seen"}

    def steps(tail_of) -> list[trajectory.Step]:
        made = []
        for e, c, round_, before in read:
            samples, coefficients = torch.searchsorted(ids, e.positions), c * unit * len(e.positions)
            differences = trajectory.loss_differences(tail_of(e), e.rows, classes, estimator)
            if before is None:
                made.append(trajectory.Step(samples, differences, coefficients, round_))
            else:  # residual: this batch's losses less the one before's
                made.append(trajectory.residual_step(
                    samples, differences, torch.searchsorted(ids, before.positions),
                    trajectory.loss_differences(tail_of(before), before.rows, classes, estimator), coefficients,
                    round_))
        return made

    broadcast_tails = _broadcast_tails(upload.tail, seen, {e.round for e in evaluates})
    keep = fed.model.defence.keep_probability(classes)
    other = math.log((1 - keep) / max(classes - 1, 1)) if keep < 1 else -math.inf

    def shown_prior(posterior: torch.Tensor) -> torch.Tensor:  # of the labels the steps show (randomized or not)
        return torch.logaddexp(posterior + math.log(keep), torch.log(-torch.expm1(posterior)) + other)

    def true_labels(shown: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:  # the randomized labels' evidence
        return shown if keep == 1 else attacks.with_randomized_label(posterior, shown, keep)  # beside the guess

    posterior = prior.log_softmax(dim=1)
    known = 1.0 if optimizer.kind == "sgd" else None  # SGD's steps give the coefficients, Adam's up to a factor
    exact = steps(lambda e: _tail_of(upload.tail, e.tail))
    shown, factors = trajectory.infer_labels(exact, shown_prior(posterior), known)
    guesses["trajectory"] = true_labels(shown, posterior)
    guesses["trajectory_broadcast_tail"] = true_labels(
        trajectory.infer_labels(steps(lambda e: broadcast_tails[e.round]), shown_prior(posterior), known)[0],
        posterior)
    if model_scores is not None:
        model_posterior = model_scores.log_softmax(dim=1)
        guesses[f"trajectory_{held_model}_prior"] = true_labels(
            trajectory.infer_labels(exact, shown_prior(model_posterior), known)[0], model_posterior)
    # what the server can do without the client's tails: replay them under its guess, search, replay again
    best_posterior = posterior if model_scores is None else model_posterior
    guess = best_posterior.argmax(dim=1)
    for _ in range(REPLAYS):
        tails = dict(zip(map(id, evaluates), _replayed_tails(fed, seen, guess, ids, upload.tail)))
        replayed = steps(lambda e, tails=tails: tails[id(e)])
        guess = true_labels(trajectory.infer_labels(replayed, shown_prior(best_posterior), known)[0], best_posterior)
    guesses["trajectory_replayed_tail"] = guess
    one_step = [(true_labels(trajectory.infer_labels([s], shown_prior(posterior), factors[s.round])[0],
                             posterior)[s.samples] == truth[s.samples]).double().mean() for s in exact]
    label_free = [(prior.argmax(dim=1)[s.samples] == truth[s.samples]).double().mean() for s in exact]
    sent = torch.searchsorted(ids, torch.cat([e.positions for e in evaluates]))
    shown_truth = torch.zeros_like(truth).index_put_((sent,), torch.cat([e.shown for e in evaluates]))
    return guesses, {"steps_read": len(exact), "unexplained_at_truth": trajectory.unexplained(exact, shown_truth, known),
                     "one_step": {"label_free": float(torch.stack(label_free).mean()),
                                  "trajectory": float(torch.stack(one_step).mean())}}


REPLAYS = 3  # rounds of replaying the tails and searching again (on one seed of the whole-run audits' recorded
# messages the third found labels the first two had not; on the two others, six found none the first two had not)


def _replayed_tails(fed: Federation, seen: Witnessed, labels: torch.Tensor, ids: torch.Tensor,
                    template: torch.nn.Module) -> list[torch.nn.Module]:
    """The tail each forward-only step (`seen.evaluates`, in order) used, as the server can replay it: from the
    round's broadcast tail, the client's first-order step on the rows the server returned that it trains on
    (`rows[0]`: the unperturbed prompts'; residual, its one set's) at `labels` (its guess of the samples `ids`), by
    the client's own `_tail_step`, with the run's optimiser (Adam's moments are per parameter, so the tail's alone
    replay; FedProx's pull towards the broadcast included). At the true labels these are the client's tails, to
    float rounding (tested)."""
    settings, tails, round_ = fed.settings, [], None
    for e in seen.evaluates:
        if e.round != round_:  # each round's steps start from its broadcast, with a fresh optimiser
            round_ = e.round
            tail = _tail_of(template, _tail_state(seen.broadcasts[round_])).train().requires_grad_(True)
            anchor = [p.detach().clone() for p in tail.parameters()]
            optimizer = build_optimizer([{"params": list(tail.parameters()), "lr": settings.lr}], settings)
        tails.append(copy.deepcopy(tail).eval().requires_grad_(False))
        guessed = labels[torch.searchsorted(ids, e.positions)]
        with torch.enable_grad():
            Client._tail_step(tail, e.rows[0].detach(), guessed, None, optimizer)
        Client._proximal_pull(zip(tail.parameters(), anchor), settings.proximal_mu)
        optimizer.step()
    return tails


def _tail_of(template: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of the tail `template` with the weights `state`."""
    tail = copy.deepcopy(template)
    tail.load_state_dict(state)
    return tail


def summary_line(result: dict) -> str:
    best, mean, labels = result["reconstruction"]["best"], result["reconstruction"]["class_mean"], result["labels"]
    return (f"best attack re-identifies {best['reidentified']:.0%} of {result['images_attacked']} images "
            f"(chance {result['chance_reidentification']:.0%}) at PSNR {best['psnr']:.1f} dB, SSIM {best['ssim']:.2f} "
            f"(class-mean image: {mean['psnr']:.1f} dB, {mean['ssim']:.2f}); labels inferred "
            f"{labels['best_attack']:.0%} against {labels['best_label_free']:.0%} label-free"
            + (f" (the upload alone, without secure aggregation: {labels['upload_alone']:.0%})"
               if "upload_alone" in labels else ""))


def _gallery(fed: Federation, chosen: torch.Tensor, seen: Witnessed, options: AuditOptions, to_pixels,
             channels: int) -> torch.Tensor:
    """(images, gallery, pixels...): each image's original first, then `gallery - 1` other training
    images of its class (seeded), never auxiliary data."""
    rng = np.random.default_rng(options.seed)
    victim_indices = np.asarray(fed.clients[options.victim].data.indices)
    rows = []
    for p in chosen.tolist():
        index = int(victim_indices[p])
        same = np.flatnonzero(fed.train_labels == fed.train_labels[index])
        others = rng.permutation(same[same != index])[: options.gallery - 1]
        images = [to_pixels(seen.images[p])] + [to_pixels(fed.train[int(i)][0]) for i in others]
        rows.append(torch.stack(images)[:, :channels])
    if min(len(r) for r in rows) < options.gallery:
        raise ConfigError(f"some class has fewer than {options.gallery} training images; lower --gallery")
    return torch.stack(rows)


def _scores(images: torch.Tensor, originals: torch.Tensor, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
    distances = (candidates - images[:, None]).flatten(2).pow(2).sum(2)  # (images, gallery)
    return {
        "psnr": peak_signal_noise_ratio(images, originals, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(images, originals, data_range=1.0, reduction="none"),
        "reidentified": distances.argmin(dim=1) == 0,
    }


def _summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"psnr": float(scores["psnr"].mean()), "ssim": float(scores["ssim"].mean()),
            "reidentified": float(scores["reidentified"].float().mean())}


def _picture(path: Path, originals: torch.Tensor, reconstructions: dict[str, torch.Tensor], scores: dict,
             columns: int = 12) -> None:
    """Originals above each attack's reconstructions, one row each, labelled with the row's mean figures."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend and figures are left as they are

    rows = {"original": originals} | reconstructions
    count = min(columns, len(originals))
    fig = Figure(figsize=(count * 0.9, len(rows) * 1.05))
    axes = fig.subplots(len(rows), count, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(count):
            ax = axes[r, c]
            image = images[c].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        label = name if name == "original" else (
            f"{name}\n{float(scores[name]['psnr'].mean()):.1f} dB\nre-id {float(scores[name]['reidentified'].float().mean()):.0%}")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)


def run_from(folder: Path, device: str | None, params: bool = True, out: str | None = None) -> Config:
    """The config of the finished run in `folder` (for `--from`), which must hold its final params unless not
    `params` (`--sends run` replays the run from its options alone), writing to `out` (default: `folder`)."""
    saved = folder / "config.json"
    if not saved.is_file() or (params and not (folder / "global.safetensors").is_file()):
        raise ConfigError(f"--from {folder}: no config.json{' and global.safetensors' * params} there (is it a "
                          "finished run?)")
    values = json.loads(saved.read_text())
    return Config.from_saved({**values, "out": out or str(folder), **({"device": device} if device else {})})


