import torch

from sfprompt.meter import CLIENT, DOWN, SERVER, UP, Meter, PeakMemory


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
