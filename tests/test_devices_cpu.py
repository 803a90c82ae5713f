"""Whether this CPU has 16-bit arithmetic of its own (devices.cpu_lacks_native), from torch's
probes and /proc/cpuinfo's flags, each faked here: every combination, worked by hand."""

from __future__ import annotations

import pytest
import torch

from evomerge import devices


@pytest.fixture
def cpu(monkeypatch):
    def fake(flags: set[str], **probes: bool | None):
        monkeypatch.setattr(devices, "_cpu_flags", lambda: set(flags))
        monkeypatch.setattr(devices, "_probe", lambda name: probes.get(name))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    return fake


def test_an_avx2_cpu_lacks_bf16_and_fp16(cpu):
    cpu({"avx2", "fma", "f16c"}, _is_avx512_bf16_supported=False, _is_amx_tile_supported=False,
        _is_amx_fp16_supported=False)
    assert devices.cpu_lacks_native(torch.bfloat16) and devices.cpu_lacks_native(torch.float16)
    assert not devices.cpu_lacks_native(torch.float32)


def test_any_native_sign_is_enough(cpu):
    cpu({"avx2", "avx512_bf16"})  # no torch probes: the flag decides
    assert not devices.cpu_lacks_native(torch.bfloat16) and devices.cpu_lacks_native(torch.float16)
    cpu(set(), _is_amx_tile_supported=True)  # AMX tiles (Sapphire Rapids) without reading cpuinfo
    assert not devices.cpu_lacks_native(torch.bfloat16)
    cpu({"avx512_fp16"}, _is_amx_fp16_supported=False)
    assert not devices.cpu_lacks_native(torch.float16)


def test_nothing_to_go_by_is_not_a_warning(cpu):
    cpu(set())  # not Linux, and a torch without the probes
    assert not devices.cpu_lacks_native(torch.bfloat16)


def test_the_advice_names_the_option_and_the_dtype():
    text = devices.slow_cpu_dtype_advice(torch.bfloat16)
    assert "no native bfloat16" in text and "fitness.options.dtype: float32" in text and "AVX512-BF16" in text
    assert "float16" in devices.slow_cpu_dtype_advice(torch.float16)

