"""The body channel: split training's per-batch exchange between clients and the body server over gRPC.

Flower carries the once-per-round traffic, but its message path polls (≥ 0.1 s a round trip in
simulation, seconds in deployment), far too slow for two exchanges per mini-batch. This channel is
a plain gRPC service with one unary method whose request and reply are the codec's bytes, so the
bytes counted are exactly those of the in-process runtime (`transport.InProcessLink`). gRPC keeps
one HTTP/2 connection per client open, multiplexes many clients on one server, does TLS, and is
already a dependency of Flower; `benchmarks/runtime.py` measures what it costs per batch.

Every call must carry the run's token (`authorization: Bearer <token>`); TLS is used when the
server is given a certificate and key and the client the root certificate that signed it.
"""

from __future__ import annotations

import hmac
from concurrent import futures

import grpc
import torch

from .codec import MAX_PAYLOAD_BYTES, CodecError, Message, ProtocolError, decode, encode
from .meter import DOWN, UP, Meter, PeakMemory
from .server import BodyServer
from .transport import decode_held, encode_held

METHOD = "/sfprompt.BodyChannel/Exchange"


def _options(max_bytes: int) -> list[tuple[str, int]]:
    """gRPC limits of one encoded batch of activations: gRPC's default (4 MiB) is too small, and
    anything larger than the run legitimately sends is refused unread."""
    max_bytes = min(max_bytes, 2**31 - 1)  # gRPC's own ceiling
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


class ChannelError(RuntimeError):
    """The body server refused a request or could not be reached; the message says which and why."""


class BodyChannelServer:
    """Serves a `BodyServer` to many clients at once on `address` ("host:port"; port 0 picks one)."""

    def __init__(self, server: BodyServer, address: str, token: str, *, certificate: bytes | None = None,
                 private_key: bytes | None = None, workers: int = 16, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        if not token:
            raise ValueError("the body channel needs a non-empty token")
        if (certificate is None) != (private_key is None):
            raise ValueError("TLS needs both a certificate and its private key")
        self.server, self.max_bytes = server, max_bytes
        self._token = f"Bearer {token}".encode()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_options(max_bytes))
        service, method = METHOD.strip("/").split("/")
        handler = grpc.unary_unary_rpc_method_handler(self._exchange)  # bytes in, bytes out
        self._grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        if certificate is not None:
            port = self._grpc.add_secure_port(address, grpc.ssl_server_credentials([(private_key, certificate)]))
        else:
            port = self._grpc.add_insecure_port(address)
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"  # the port actually bound
        self._grpc.start()

    def _exchange(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        presented = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(presented.encode(), self._token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong run token")
        try:
            reply = self.server.handle(decode(request, self.server.device, self.max_bytes))
        except (CodecError, ProtocolError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return encode(reply)

    def stop(self, grace_s: float = 1.0) -> None:
        self._grpc.stop(grace_s).wait()

    def __enter__(self) -> "BodyChannelServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ChannelLink:
    """A client's end of the channel: the same `request` as `InProcessLink`, counted the same way."""

    def __init__(self, address: str, token: str, meter: Meter, device: torch.device, *,
                 root_certificate: bytes | None = None, timeout_s: float = 300.0,
                 max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        self.address, self.meter, self.device, self.timeout_s = address, meter, device, timeout_s
        self.max_bytes = max_bytes
        self._metadata = (("authorization", f"Bearer {token}"),)
        if root_certificate is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificate),
                                                 _options(max_bytes))
        else:
            self._channel = grpc.insecure_channel(address, _options(max_bytes))
        self._call = self._channel.unary_unary(METHOD)

    def request(self, message: Message, phase: str, memory: PeakMemory | None = None) -> Message:
        payload = encode_held(message, memory)
        self.meter.count_message(UP, phase, payload)
        try:
            reply = self._call(payload, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as err:
            raise ChannelError(f"body server {self.address}: {err.code().name}: {err.details()}") from None
        self.meter.count_message(DOWN, phase, reply)
        return decode_held(reply, self.device, self.max_bytes, memory)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ChannelLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
