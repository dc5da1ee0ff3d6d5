"""--precision: the server's body in bf16 / fp16 mixed precision, float32 on the wire, gradients that
survive half precision, and refusals where it has no meaning."""

import pytest
import torch

from sfprompt.codec import Message
from sfprompt.config import Config, ConfigError
from sfprompt.meter import Meter
from sfprompt.runner import run
from sfprompt.server import BodyServer

from conftest import tiny_split
from test_runner import tiny_config


def exchange(precision: str, grad_size: float, scaled: bool = True):
    """One forward and backward through a server whose body runs in `precision`."""
    _, model = tiny_split(client_blocks=1)
    model.body.precision = precision
    server = BodyServer(model, Meter(), torch.device("cpu"))
    if not scaled:
        server._grad_scale = lambda grad: 1.0
    session = server.admit("0")
    tokens = torch.randn(3, model.layout.length, model.layout.width, generator=torch.Generator().manual_seed(0))
    meta = {"client": "0", "session": session}
    rows = server.handle(Message("forward", {"tokens": tokens}, meta | {"seq": 1})).tensors["rows"]
    grad = grad_size * torch.randn(rows.shape, generator=torch.Generator().manual_seed(1))
    return rows, server.handle(Message("backward", {"grad": grad}, meta | {"seq": 2})).tensors["grad"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_bodies_answer_close_to_fp32_in_float32(precision):
    rows, grad = exchange("fp32", 1.0)
    half_rows, half_grad = exchange(precision, 1.0)
    assert half_rows.dtype == half_grad.dtype == torch.float32  # the wire format does not change
    assert 0 < relative_error(half_rows, rows) < 0.02  # not fp32 (it really ran in half), but close
    assert 0 < relative_error(half_grad, grad) < 0.05


def test_fp16_scales_small_gradients_so_they_do_not_underflow():
    _, grad = exchange("fp32", 1e-9)
    _, scaled = exchange("fp16", 1e-9)
    _, unscaled = exchange("fp16", 1e-9, scaled=False)
    assert relative_error(scaled, grad) < 1e-3
    # What the scale prevents: the blocks' half-precision products flush such gradients to zero (only
    # the float32 residual path carries them): 5 % off here, in a body of one block.
    assert relative_error(unscaled, grad) > 1e-2


def test_a_run_in_bf16_trains_and_records_its_precision(imagefolder, tmp_path):
    summary = run(tiny_config(imagefolder, tmp_path, precision="bf16", rounds=1), progress=False, log=lambda _: None)
    assert summary["config"]["precision"] == "bf16"
    assert summary["final_accuracy"] == summary["final_accuracy"]  # not NaN: a real evaluation through the bf16 body


@pytest.mark.parametrize("changes, message", [
    (dict(method="fl", precision="bf16"), "no server body"),
    (dict(method="fl-prompt", precision="fp16"), "no server body"),
    (dict(method="sfl", train_body=True, precision="fp16"), "use bf16"),
    (dict(precision="fp8"), "must be one of fp32, bf16, fp16"),
])
def test_precision_is_refused_where_it_has_no_meaning(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config(**changes)
