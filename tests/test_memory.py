"""Peak memory per phase (nanotorl.memory): each phase's peak holds what it allocated, and only its own."""
import torch

from nanotorl.memory import PhasePeaks, peak_bytes

BIG = 400 << 20  # bytes: far above the noise of a Python process's own allocations


def allocate_and_free(nbytes: int) -> None:
    block = torch.ones(nbytes // 4)  # written: the pages are resident
    assert block.sum() > 0


def test_each_phase_counts_its_own_peak_and_a_new_phase_starts_from_the_current_memory():
    cpu = torch.device("cpu")
    peaks = PhasePeaks(cpu)
    peaks.start()
    base = peak_bytes(cpu)
    allocate_and_free(BIG)
    peaks.end("big")
    allocate_and_free(BIG // 8)
    peaks.end("small")
    gb = peaks.take()
    assert gb["memory_big_gb"] * 1e9 >= base + BIG * 0.95
    assert gb["memory_small_gb"] * 1e9 < base + BIG / 2  # the big phase's peak was forgotten
    assert peaks.take() == {}
