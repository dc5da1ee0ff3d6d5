import torch
from torch.utils.flop_counter import FlopCounterMode

from sfprompt.meter import CLIENT, DOWN, SERVER, UP, Meter, PeakMemory
from sfprompt.model import create_vit


def test_flops_are_counted_per_side_and_phase():
    meter, layer, x = Meter(), torch.nn.Linear(16, 8), torch.randn(4, 16)
    with meter.work(CLIENT, "local"):
        layer(x)
    with meter.work(SERVER, "split"):
        layer(x)
        layer(x)
    costs = meter.take()
    assert costs["flops_by_phase"] == {"client/local": 2 * 4 * 16 * 8, "server/split": 2 * 2 * 4 * 16 * 8}
    assert costs["client_flops"] == 1024 and costs["server_flops"] == 2048
    assert meter.take()["client_flops"] == 0  # take() starts the next round at zero


def test_bytes_are_counted_per_direction_and_phase():
    meter = Meter()
    meter.count_message(UP, "split", b"x" * 10)
    meter.count_message(DOWN, "split", b"x" * 3)
    meter.count_message(UP, "upload", b"x" * 5)
    costs = meter.take()
    assert (costs["bytes_up"], costs["bytes_down"]) == (15, 3)
    assert costs["messages_by_phase"] == {"down/split": 1, "up/split": 1, "up/upload": 1}


def test_peak_memory_sees_allocations_and_frees():
    memory = PeakMemory()
    held = torch.zeros(1000)  # 4,000 bytes that existed before the work
    memory.hold(held)
    with memory:
        for _ in range(5):
            temporary = torch.ones(2000)  # 8,000 bytes, the previous one freed on rebinding
            total = temporary.sum()
        del temporary, total
    assert memory.peak == 4000 + 2 * 8000 + 4  # two temporaries overlap at rebinding, plus the sum
    assert memory.current == 4000


def test_peak_memory_counts_module_state_once():
    memory = PeakMemory()
    layer = torch.nn.Linear(10, 10)
    memory.hold(layer, layer)
    assert memory.current == (100 + 10) * 4


def _vit_flops(fused: bool) -> int:
    """FLOPs of a forward and backward of a tiny timm ViT, attention fused (timm's default) or not."""
    torch.manual_seed(0)
    vit = create_vit("test_vit", num_classes=4, image_size=32, weights="none")
    for block in vit.blocks:
        block.attn.fused_attn = fused
    meter = Meter()
    with meter.work(CLIENT, "local"):
        vit(torch.randn(2, 3, 32, 32)).sum().backward()
    return meter.take()["client_flops"]


def test_fused_attention_counts_what_unfused_attention_counts():
    """The same configuration counts the same FLOPs on every device: the CPU's fused attention kernel,
    which PyTorch's counter skips, is counted as its two matrix products, forward and backward."""
    with FlopCounterMode(display=False) as plain:  # what the counter alone sees on a CPU
        torch.manual_seed(0)
        create_vit("test_vit", num_classes=4, image_size=32, weights="none")(torch.randn(2, 3, 32, 32)).sum().backward()
    assert _vit_flops(fused=True) == _vit_flops(fused=False) > plain.get_total_flops()
