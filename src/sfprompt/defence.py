"""What a client does to its messages so that the server learns less about its images and labels.

Every defence here is applied by the client, with randomness the server never sees (a private
generator, see `Client`), to exactly what leaves it:

- the activations of a `forward` (`protect`): the patch tokens in a random order per sample
  (`shuffle`), and/or each sample's data-dependent rows clipped to an L2 norm and blurred with
  Gaussian noise (`clip_norm`, `noise_multiplier`), which makes every release of a sample a Gaussian
  mechanism with a formal (epsilon, delta) (`local_epsilon`);
- the labels behind a `backward` (`randomized_response`): the gradient sent for the prompts is that
  of the loss at a label kept with probability e^eps / (e^eps + K - 1) and otherwise replaced by
  another class, drawn once per sample so repeated rounds reveal nothing new (label-DP with epsilon
  `label_epsilon`). The tail still learns from the true labels, and each client uploads it: the
  guarantee covers the gradients, not the upload (`privacy_notice` says where each one holds);
- the upload (`private_upload`): its change from the broadcast clipped and noised by Flower's `LocalDpMod`, local
  (epsilon, delta)-DP of the client's whole data against the server (`--upload-epsilon`), composed over the rounds
  by Opacus' accountant (`local_epsilon`).

Pooling the patch tokens (`--pool-tokens`) is part of the model split (`model.PromptedHead`) since
it changes the sequence the body runs on. What each defence hides is not assumed here: `sfprompt
audit` attacks it with an attacker who knows it, and docs/privacy.md holds the measurements.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Defence:
    shuffle: bool = False
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    label_epsilon: float | None = None

    @classmethod
    def from_config(cls, config) -> "Defence":
        return cls(config.shuffle_tokens, config.clip_norm, config.noise_multiplier, config.label_epsilon)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of a sample's data-dependent rows."""
        return self.noise_multiplier * (self.clip_norm or 0.0)

    def protect(self, tokens: torch.Tensor, private_rows: slice, patch_rows: slice,
                generator: torch.Generator | None) -> torch.Tensor:
        """The activations a client sends, from the head's tokens (B, L, D).

        `private_rows` are the rows that depend on the input (clipped and noised); `patch_rows` the
        patch tokens (shuffled). Differentiable, so the prompts still train through it.
        """
        if self.shuffle:
            order = torch.rand(tokens.shape[0], len(range(tokens.shape[1])[patch_rows]), generator=generator)
            order = order.argsort(dim=1).to(tokens.device)  # (B, N): a fresh permutation per sample
            patches = tokens[:, patch_rows].gather(1, order[..., None].expand(-1, -1, tokens.shape[2]))
            tokens = torch.cat([tokens[:, : patch_rows.start], patches, tokens[:, patch_rows.stop :]], dim=1)
        if self.clip_norm is not None:
            private = tokens[:, private_rows]
            norms = private.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
            scale = (self.clip_norm / norms).clamp(max=1.0)[:, None, None]
            private = private * scale
            if self.noise_multiplier > 0:
                noise = torch.randn(private.shape, generator=generator, dtype=private.dtype).to(private.device)
                private = private + self.noise_std * noise
            tokens = torch.cat([tokens[:, : private_rows.start], private, tokens[:, private_rows.stop :]], dim=1)
        return tokens

    def keep_probability(self, num_classes: int) -> float:
        """Probability that randomized response shows a sample's true label (1 without it)."""
        if self.label_epsilon is None:
            return 1.0
        return math.exp(self.label_epsilon) / (math.exp(self.label_epsilon) + num_classes - 1)

    def randomized_response(self, labels: torch.Tensor, draws: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels a client's backward gradients are computed with: each true label kept with
        `keep_probability`, otherwise one of the other classes uniformly (K-ary randomized response).

        `draws` (B, 2) are each sample's own two uniform numbers in [0, 1), fixed for the sample, so
        it shows the same label every time it is sent (`labels` itself without the defence)."""
        if self.label_epsilon is None:
            return labels
        keep = draws[:, 0] < self.keep_probability(num_classes)
        shift = 1 + (draws[:, 1] * (num_classes - 1)).long().clamp(max=num_classes - 2)  # another class, uniformly
        return torch.where(keep, labels, (labels + shift) % num_classes)


def _image_leaks(config) -> str:
    """What else leaves a client that depends on its clean images, beside the noised activations."""
    leaks = []
    if config.client_blocks > 0 or config.client_budgets is not None:
        leaks.append("with client blocks the prompts, uploaded, train on the clean images")
    if config.method == "sfprompt" and config.local_epochs > 0 and config.local_classifier == "shared":
        leaks.append("the tail, uploaded, trains on clean head features in the local phase")
    if config.method == "sfprompt" and config.keep_ratio < 1 and config.prune_keep != "random":
        leaks.append("pruning chooses which samples are sent from the clean images")
    return "; ".join(leaks) if leaks else "here nothing does, the uploads being computed from the noised sends"


def local_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of local (epsilon, delta)-DP for what is released `releases` times (one sample's activations, one
    client's upload), each clipped to norm C with Gaussian noise of std `noise_multiplier` x C.

    Any two inputs are neighbours (local DP), so one release has L2 sensitivity 2C: the Gaussian
    mechanism's noise multiplier is `noise_multiplier / 2`. Composed with Renyi DP by Opacus's
    accountant (no subsampling: every kept sample is sent in every split epoch; a client may be sampled every round).
    """
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if noise_multiplier <= 0:
        return math.inf
    orders = [1 + x / 100.0 for x in range(1, 100)] + [2 + x / 10.0 for x in range(100)] + list(range(12, 256))
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier / 2, steps=releases, orders=orders)
    with warnings.catch_warnings():  # tiny noise: the smallest order is optimal and the bound is loose, as stated
        warnings.simplefilter("ignore", UserWarning)
        epsilon, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(epsilon)


def upload_noise_multiplier(epsilon: float, delta: float) -> float:
    """The std of the noise Flower's `LocalDpMod` adds to each upload value, over the clipping norm C: its
    calibration of one Gaussian mechanism to (epsilon, delta), sensitivity x sqrt(2 ln(1.25 / delta)) / epsilon, at
    sensitivity 2C (any two data sets of a client give changes at most 2C apart: local DP of its whole data)."""
    return 2 * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


_GLOBAL_NUMPY = threading.Lock()  # `private_upload` seeds NumPy's global generator for Flower: one client at a time


def private_upload(broadcast: Mapping[str, torch.Tensor], upload: Mapping[str, torch.Tensor], clip: float,
                   epsilon: float, delta: float, secret: Sequence[int]) -> dict[str, torch.Tensor]:
    """`upload` as Flower's `LocalDpMod` lets it leave a client: its change from `broadcast` (every tensor together)
    clipped to L2 norm `clip`, then Gaussian noise of std `upload_noise_multiplier` x `clip` on every value.

    The mod is Flower's, run on the messages as the Flower runtime carries them (`flower.records`), in both
    runtimes. It draws its noise from NumPy's global generator; here that generator is seeded from the client's
    `secret` (words derived from its private seed: a deployed node's is a secret the server cannot search) for the
    call and restored after, one client at a time, so that a run repeats and nothing else's draws move. An upload
    equal to the broadcast (which the mod cannot clip: it divides by the change's norm) gets the mod's noise alone,
    by Flower's own function, so that it is not dropped: its drop would tell the server it did not change."""
    import logging

    from flwr.app import Context, Message, RecordDict
    from flwr.clientapp.mod import LocalDpMod

    from .flower.records import from_arrays, to_arrays, train_message

    if upload.keys() != broadcast.keys():
        raise ValueError(f"the upload's tensors are not the broadcast's ({sorted(upload.keys() ^ broadcast.keys())[:4]}):"
                         " Flower's LocalDpMod clips a change of the broadcast state")
    change = math.sqrt(sum(float((upload[name].double() - broadcast[name].double()).square().sum()) for name in upload))
    shapes = {name: tensor.shape for name, tensor in upload.items()}  # the mod leaves a 0-d array as it is: 1-d

    def trained(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"upload": to_arrays({name: t.reshape(-1) for name, t in upload.items()})}),
                       reply_to=msg)

    mod = LocalDpMod(clip, 2 * clip, epsilon, delta)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    flower_log = logging.getLogger("flwr")
    with _GLOBAL_NUMPY:
        saved, level = np.random.get_state(), flower_log.level
        np.random.seed(list(secret))
        flower_log.setLevel(logging.WARNING)  # its two lines a client a round; the run's log says it once
        try:
            if change == 0:  # the mod would divide by it: a zero change clips to itself, and gets the mod's noise alone
                from flwr.clientapp.mod.localdp_mod import add_gaussian_noise_inplace  # the function the mod calls
                noisy = {name: t.detach().cpu().reshape(-1).numpy().copy() for name, t in upload.items()}
                add_gaussian_noise_inplace(list(noisy.values()), upload_noise_multiplier(epsilon, delta) * clip)
                noisy = {name: torch.from_numpy(array) for name, array in noisy.items()}
            else:
                sent = {name: tensor.reshape(-1) for name, tensor in broadcast.items()}
                reply = mod(train_message(RecordDict({"global": to_arrays(sent)})), context, trained)
                if reply.has_error():
                    raise ValueError(f"Flower's LocalDpMod refused the upload: {reply.error.reason}")
                noisy = from_arrays(reply.content["upload"])
        finally:
            np.random.set_state(saved)
            flower_log.setLevel(level)
    return {name: noisy[name].reshape(shapes[name]).to(tensor.device, tensor.dtype) for name, tensor in upload.items()}


def releases(config) -> int:
    """The most times a run sends one sample's activations: once for linear-probe (the first round its
    client is sampled), otherwise every split epoch of every round (a client sampled every round), once more
    when probe rounds open the run and once more when refit rounds close it (with the trained prompts)."""
    if config.method == "linear-probe":
        return 1
    own = config.rounds - config.probe_rounds - config.refit_rounds
    return config.split_epochs * own + (1 if config.probe_rounds else 0) + (1 if config.refit_rounds else 0)


def privacy_notice(config) -> str:
    """What the server can learn under `config`, said plainly in every run's log (figures: docs/privacy.md)."""
    sends = releases(config)
    if config.method in ("fl", "fl-prompt"):
        return ("privacy: clients send whole-model or prompt updates, never activations; gradient inversion of "
                "updates is not audited here")
    images = ("the activations are an affine map of the pixels (clipped or not): the server can reconstruct every image sent"
              if config.client_blocks == 0 and not config.pool_tokens
              else "the server can still reconstruct recognisable images from the activations")
    if config.noise_multiplier > 0:
        epsilon = local_epsilon(config.noise_multiplier, sends, config.dp_delta)
        images = (f"the activations sent are local ({epsilon:.3g}, {config.dp_delta:g})-DP per sample over {sends} "
                  f"send{'s' * (sends != 1)}, which covers the images only as far as nothing else leaves the "
                  f"client from them: {_image_leaks(config)}; how much that hides in practice is measured, not implied")
    if config.method == "linear-probe":
        labels = "no message depends on a sample's label, but each client's statistics show its label counts"
    elif config.prompt_updates == "forward-only" and (config.client_blocks or config.client_budgets is not None):
        taken = "randomized-response" if config.label_epsilon is not None else "the true"
        labels = ("no gradient is sent (forward-only), and with client blocks neither the prompts nor the "
                  "directions of a step reach the server in the clear (a head with no blocks under --client-budgets "
                  "sends them): the audit reads no prompt trajectory, but a server that inverted the client's blocks "
                  f"might read the steps back, taken at {taken} labels (not measured with blocks); each client "
                  "uploads a tail trained on its true labels")
    elif config.prompt_updates == "forward-only":
        steps = ("taken at randomized-response labels (--label-epsilon), so they depend on the true ones only through "
                 "those and the tail trained on them" if config.label_epsilon is not None else
                 "taken at the true labels, which explain every step exactly: from one round's steps the audit's "
                 "attack, searching from the guess of the model the server broadcast, named every label that guess "
                 "got wrong at --directions 1, 4 and 16 (on mnist-5k, knowing the client's tail; 0 to 1.5 points "
                 "replaying the tails itself at 1, all at 4 and 16), and from a whole run's of the default recipe, "
                 "searching from the final model's guess, up to 2.5 points over it at --directions 1 knowing each "
                 "step's tail, 1.5 replaying the tails itself (--label-epsilon 3 kept the first to a quarter point); "
                 "these are the antithetic and one-sided estimators' steps: the residual one's, each explained by "
                 "two batches' labels, are measured in docs/privacy.md")
        labels = ("no gradient is sent (forward-only), but the server reads each prompt step's loss differences back "
                  f"from the prompts it receives, {steps}; each client uploads a tail trained on its true labels")
    elif config.label_epsilon is None:
        labels = "the backward gradients give the server every label"
    else:
        labels = (f"the gradients sent are {config.label_epsilon:g}-label-DP (randomized response), but no guarantee "
                  "covers the labels: the tail each client uploads is trained on the true ones")
    if config.method != "linear-probe" and config.has_probe_rounds:
        labels += ("; the statistics a client uploads in the probe rounds (--probe-rounds, --refit-rounds) show its "
                   "label counts and class means")
    return (f"privacy: {images}; {labels}{_upload_notice(config)}. Measured in docs/privacy.md; `sfprompt audit` with these "
            "options measures this run")


def _upload_notice(config) -> str:
    """What `privacy_notice` says of the uploads under --upload-epsilon (nothing without it)."""
    if config.upload_epsilon is None:
        return ""
    multiplier, delta = upload_noise_multiplier(config.upload_epsilon, config.dp_delta), config.dp_delta
    one, total = local_epsilon(multiplier, 1, delta), local_epsilon(multiplier, config.rounds, delta)
    return (f"; each upload's change is clipped to {config.upload_clip:g} and noised by Flower's LocalDpMod (std "
            f"{multiplier * config.upload_clip:.3g} on every value: its classic calibration to epsilon "
            f"{config.upload_epsilon:g}, proven for epsilon < 1), local DP of the client's whole data at "
            f"({one:.3g}, {delta:g}) an upload and ({total:.3g}, {delta:g}) over the {config.rounds} rounds a client "
            "may upload in (Opacus' RDP accountant), for the uploaded tensors: its sample count and losses travel in "
            "the clear beside them")
