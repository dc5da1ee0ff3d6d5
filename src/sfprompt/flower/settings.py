"""The Flower run config (`[tool.flwr.app.config]`, `flwr run . --run-config`) as a `Config` and body options.

Every `Config` option is a run-config key (kebab-case) except `clients`, which is the number of
SuperNodes in the federation. TOML has no null, so an empty string stands for an unset optional
option (`alpha = ""` is IID). Keys starting with `body-` configure the body channel.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import Config, ConfigError


@dataclass(frozen=True)
class BodyOptions:
    address: str = "127.0.0.1:0"  # where the body server listens; port 0 picks a free one
    public_address: str = ""  # what clients dial, when it differs from `address` (a real deployment)
    token: str = ""  # the run's shared secret; empty: a fresh random one, sent to clients by Flower
    certificate: str = ""  # PEM files: with both, the channel uses TLS
    private_key: str = ""
    root_certificate: str = ""  # the CA that signed `certificate`, sent to clients (default: itself)
    timeout_s: float = 600.0  # a client's wait for one exchange; the server's wait for a backward
    wait_for_nodes_s: float = 300.0  # how long the ServerApp waits for every partition's SuperNode

    def resolved_token(self) -> str:
        return self.token or secrets.token_urlsafe(32)

    def tls(self) -> tuple[bytes, bytes, bytes] | None:
        """(certificate, private key, root certificate) as bytes, or None without TLS."""
        if not self.certificate and not self.private_key:
            return None
        if not (self.certificate and self.private_key):
            raise ConfigError("body-certificate and body-private-key must be given together")
        files = [self.certificate, self.private_key, self.root_certificate or self.certificate]
        for path in files:
            if not Path(path).is_file():
                raise ConfigError(f"body TLS file {path} does not exist")
        certificate, key, root = (Path(path).read_bytes() for path in files)
        return certificate, key, root


def from_run_config(run_config: Mapping[str, Any]) -> tuple[Config, BodyOptions]:
    """Split a Flower run config into the run's `Config` and the body channel's options."""
    body_fields = {f.name for f in dataclasses.fields(BodyOptions)}
    optional = {f.name for f in dataclasses.fields(Config) if "Optional" in str(f.type)}
    config_values, body_values = {}, {}
    for key, value in run_config.items():
        if key.startswith("body-"):
            name = key[len("body-"):].replace("-", "_")
            if name not in body_fields:
                raise ConfigError(f"unknown run-config key {key!r}; body keys: "
                                  f"{', '.join('body-' + n.replace('_', '-') for n in sorted(body_fields))}")
            body_values[name] = float(value) if name.endswith("_s") else str(value)
        elif key == "clients":
            raise ConfigError("'clients' is not a run-config key under Flower: it is the number of SuperNodes")
        else:
            name = key.replace("-", "_")
            config_values[key] = None if name in optional and value == "" else value
    return Config.from_dict(config_values), BodyOptions(**body_values)


def run_config_defaults() -> dict[str, Any]:
    """What `[tool.flwr.app.config]` should hold: every option at its default (kept in sync by a test)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name != "clients":
            values[f.name.replace("_", "-")] = "" if f.default is None else f.default
    for f in dataclasses.fields(BodyOptions):
        values["body-" + f.name.replace("_", "-")] = f.default
    return values
