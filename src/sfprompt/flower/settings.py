"""The Flower run config (`[tool.flwr.app.config]`, `flwr run . --run-config`) as a `Config` and
the Flower runtime's own options.

Every `Config` option is a run-config key (kebab-case) except `clients`, which is the number of
SuperNodes in the federation. TOML has no null, so an empty string stands for an unset optional
option (`alpha = ""` is IID). The keys of `FlowerOptions` configure the body channel and resuming.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import Config, ConfigError


@dataclass(frozen=True)
class FlowerOptions:
    body_address: str = "127.0.0.1:0"  # where the body server listens; port 0 picks a free one
    body_public_address: str = ""  # what clients dial, when it differs from `address` (a real deployment)
    body_token: str = ""  # the run's shared secret; empty: a fresh random one, sent to clients by Flower
    body_certificate: str = ""  # PEM files: with both, the channel uses TLS
    body_private_key: str = ""
    body_root_certificate: str = ""  # the CA that signed the certificate, sent to clients (default: itself)
    body_timeout_s: float = 600.0  # a client's wait for one exchange; the server's wait for a backward
    body_batching: bool = False  # run concurrent clients' requests through the body as one batch
    body_batch_window_s: float = 0.01  # how long a batch waits for more clients' requests
    body_batch_samples: int = 0  # the most samples a forward batch gathers (0: the device's, server.BATCH_SAMPLES)
    wait_for_nodes_s: float = 300.0  # how long the ServerApp waits for every partition's SuperNode
    resume: bool = False  # continue the run in `out` after its last checkpointed round
    max_examples: int = 0  # the most examples a node with its own data may weigh in FedAvg (0: what it reported)
    secure_aggregation: bool = False  # uploads averaged by Flower's SecAgg+: the server sees only their average
    secagg_clipping_range: float = 64.0  # SecAgg+ clips each weighted upload value to +-this before quantising it
    secagg_threshold: float = 0.5  # the share of a round's clients whose key shares recover a dropped one's masks

    def resolved_token(self) -> str:
        return self.body_token or secrets.token_urlsafe(32)

    def tls(self) -> tuple[bytes, bytes, bytes] | None:
        """(certificate, private key, root certificate) as bytes, or None without TLS."""
        if not self.body_certificate and not self.body_private_key:
            return None
        if not (self.body_certificate and self.body_private_key):
            raise ConfigError("body-certificate and body-private-key must be given together")
        files = [self.body_certificate, self.body_private_key, self.body_root_certificate or self.body_certificate]
        for path in files:
            if not Path(path).is_file():
                raise ConfigError(f"body TLS file {path} does not exist")
        certificate, key, root = (Path(path).read_bytes() for path in files)
        return certificate, key, root


def from_run_config(run_config: Mapping[str, Any]) -> tuple[Config, FlowerOptions]:
    """Split a Flower run config into the run's `Config` and the Flower runtime's options."""
    own = {f.name: f for f in dataclasses.fields(FlowerOptions)}
    optional = {f.name for f in dataclasses.fields(Config) if "Optional" in str(f.type)}
    config_values, own_values = {}, {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in own:
            kind = type(own[name].default)
            if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
                raise ConfigError(f"run-config key {key!r} expects {kind.__name__}, got {value!r}")
            own_values[name] = kind(value)
        elif name == "clients":
            raise ConfigError("'clients' is not a run-config key under Flower: it is the number of SuperNodes")
        else:
            config_values[key] = None if name in optional and value == "" else value
    config, options = Config.from_dict(config_values), FlowerOptions(**own_values)
    if options.body_batch_window_s < 0:
        raise ConfigError(f"body-batch-window-s must be 0 or more, got {options.body_batch_window_s}")
    if options.body_batch_samples < 0:
        raise ConfigError(f"body-batch-samples is 0 (the device's default) or more, got {options.body_batch_samples}")
    if not options.secagg_clipping_range > 0:
        raise ConfigError(f"secagg-clipping-range must be positive, got {options.secagg_clipping_range}")
    if not 0 < options.secagg_threshold <= 1:
        raise ConfigError(f"secagg-threshold is a share of the round's clients, in (0, 1], got {options.secagg_threshold}")
    if options.body_batching and config.train_body:
        raise ConfigError("body-batching cannot batch a trained body (--train-body keeps a body copy per client)")
    if options.secure_aggregation:
        check_secure_aggregation(config, options.secagg_clipping_range)
    return config, options


def check_secure_aggregation(config: Config, clipping_range: float) -> None:
    """Refuse what Flower's SecAgg+ cannot do, before any round: average a method whose clients train one after
    another, give a robust aggregator the uploads it ranks, mask a single client's upload, sum more clients than
    its quantised sum holds, or keep an upload noised (--upload-epsilon) so much that its values pass the range
    it clips to (`clipping_range`; six standard deviations of the noise stay within it)."""
    from ..aggregate import ROBUST
    from ..defence import upload_noise_multiplier
    from ..methods import METHODS
    from .secure import MAX_CLIENTS

    if METHODS[config.method].sequential:
        raise ConfigError(f"secure-aggregation averages a round's uploads, but {config.method} has none to average "
                          "(its clients train one after another)")
    if config.aggregator in ROBUST:
        raise ConfigError(f"--aggregator {config.aggregator} needs each client's upload, which secure-aggregation "
                          "hides: the server holds only their average")
    most = config.most_clients_a_round
    if not 2 <= config.clients_per_round or most > MAX_CLIENTS:
        raise ConfigError(f"secure-aggregation needs 2 to {MAX_CLIENTS} clients a round (a single upload cannot be "
                          f"hidden; Flower's sum overflows beyond), got {config.clients_per_round}"
                          + (f" ({most} in a probe round: --probe-clients sets how many)"
                             if most != config.clients_per_round else ""))
    if config.upload_epsilon is not None:
        std = upload_noise_multiplier(config.upload_epsilon, config.dp_delta) * config.upload_clip
        if 6 * std > clipping_range:
            raise ConfigError(f"--upload-epsilon {config.upload_epsilon:g} with --upload-clip {config.upload_clip:g} "
                              f"adds noise of std {std:.3g} to each upload value, beyond what secure-aggregation's "
                              f"secagg-clipping-range of +-{clipping_range:g} keeps (6 standard deviations): raise "
                              f"it to {6 * std:.3g} or more, or noise less")


def as_run_config(config: Config) -> dict[str, Any]:
    """A `Config` as Flower run-config keys, the inverse of `from_run_config`'s first half (no `clients`:
    under Flower that is the number of SuperNodes; "" for an unset optional option, and for one that took
    its method's default, so that another method set in the run config takes its own)."""
    return {key.replace("_", "-"): "" if value is None else value
            for key, value in config.given().items() if key != "clients"}


def run_config_defaults() -> dict[str, Any]:
    """What `[tool.flwr.app.config]` should hold: every option at its default (kept in sync by a test)."""
    options = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(FlowerOptions)}
    return as_run_config(Config()) | options
