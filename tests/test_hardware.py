"""Hardware catalog integrity and this-machine detection."""

import json
import sys
from pathlib import Path

import psutil
import pytest

from qlab.core.errors import QlabError
from qlab.models import hardware

FP8 = {"fp8_e4m3", "fp8_e5m2"}
FP8_ARCHS = {"Hopper", "Ada Lovelace", "Blackwell"}


@pytest.fixture(scope="module")
def entries() -> list[hardware.Hardware]:
    return hardware.catalog()


def test_catalog_has_enough_unique_entries(entries):
    ids = [hw.id for hw in entries]
    assert len(ids) >= 20
    assert len(ids) == len(set(ids))
    assert all(hw.id == hw.id.lower() and " " not in hw.id for hw in entries)


def test_every_entry_in_the_file_has_the_required_fields():
    raw = json.loads(hardware.CATALOG_PATH.read_text())
    assert raw["version"] and raw["units"]["memory_bytes"]
    required = {"id", "name", "kind", "vendor", "arch", "memory_bytes", "bandwidth_bytes_per_s", "tflops",
                "native_formats", "notes", "sources"}
    for entry in raw["hardware"]:
        assert required <= entry.keys(), entry.get("id")
        assert all(source["title"] for source in entry["sources"]), entry["id"]


def test_entries_have_positive_sizes_known_formats_and_sources(entries):
    for hw in entries:
        assert hw.kind in {"gpu", "cpu", "soc"}
        assert isinstance(hw.memory_bytes, int) and hw.memory_bytes > 0, hw.id
        assert isinstance(hw.bandwidth_bytes_per_s, int) and hw.bandwidth_bytes_per_s > 0, hw.id
        assert "fp32" in hw.native_formats, hw.id
        assert set(hw.native_formats) <= set(hardware.NATIVE_FORMATS), hw.id
        assert set(hw.tflops) <= hardware.TFLOPS_DTYPES, hw.id
        assert all(v > 0 for v in hw.tflops.values()), hw.id
        assert hw.notes and hw.sources, hw.id
        assert not hw.is_detected


def test_fp8_and_fp4_only_where_the_architecture_has_them(entries):
    for hw in entries:
        if FP8 & set(hw.native_formats) or "fp8" in hw.tflops:
            assert hw.arch in FP8_ARCHS, hw.id
        if "fp4_e2m1" in hw.native_formats:
            assert hw.arch == "Blackwell", hw.id
    for hw_id in ("h100-sxm-80gb", "h200-sxm-141gb", "l40s", "l4", "rtx-4090"):
        assert set(hardware.get(hw_id).native_formats) >= FP8, hw_id
    for hw_id in ("a100-sxm-80gb", "a100-40gb", "t4", "a10", "rtx-3090"):
        assert not FP8 & set(hardware.get(hw_id).native_formats), hw_id


def test_native_format_names_are_registered_formats():
    formats = pytest.importorskip("qlab.core.formats")
    assert set(hardware.NATIVE_FORMATS) <= set(formats.FORMATS)


def test_turing_has_no_bf16():
    t4 = hardware.get("t4")
    assert "bf16" not in t4.native_formats and "bf16" not in t4.tflops
    assert "fp16" in t4.native_formats


def test_cpu_int8_only_with_a_dot_product_unit(entries):
    assert "int8" not in hardware.get("cpu-x86-avx2").native_formats
    for hw in entries:
        if hw.kind == "cpu" and "int8" in hw.native_formats:
            assert any(word in hw.arch for word in ("VNNI", "AMX", "dotprod")), hw.id


def test_anchor_figures():
    h100 = hardware.get("h100-sxm-80gb")
    assert h100.memory_bytes == 80 * 10**9
    assert h100.bandwidth_bytes_per_s == 3_350_000_000_000
    assert h100.tflops["bf16"] == 989
    assert hardware.get("apple-m4-max").bandwidth_bytes_per_s == 546 * 10**9


def test_get_is_case_insensitive():
    assert hardware.get(" H100-SXM-80GB ").id == "h100-sxm-80gb"


def test_unknown_id_raises_one_line_error():
    with pytest.raises(QlabError) as info:
        hardware.get("h100-sxm-8gb")
    message = str(info.value)
    assert "\n" not in message
    assert "h100-sxm-80gb" in message


def test_catalog_returns_a_copy():
    hardware.catalog().clear()
    assert len(hardware.catalog()) >= 20


def test_this_machine_is_detected():
    hw = hardware.get("this-machine")
    assert hw is hardware.detect_this_machine()
    assert hw.id == "this-machine" and hw.is_detected
    assert hw.bandwidth_bytes_per_s is None and hw.tflops is None
    assert hw.host.ram_bytes > 0 and hw.memory_bytes > 0
    assert hw.host.ram_bytes <= psutil.virtual_memory().total
    assert 1 <= hw.host.physical_cores <= hw.host.logical_cores
    assert 1 <= hw.host.usable_cores <= hw.host.logical_cores
    assert hw.host.cpu_model
    assert "fp32" in hw.native_formats
    # The name sits mid-sentence in the verdict ("not faster on ..."), so it must not start with a capital "This".
    assert hw.name.endswith("(this machine)") and not hw.name.startswith("This")


def _cpuinfo_flags() -> frozenset[str]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    sets = [set(line.split(":", 1)[1].split()) for line in lines if line.startswith(("flags", "Features"))]
    return frozenset(set.intersection(*sets)) if sets else frozenset()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_detected_flags_match_proc_cpuinfo():
    expected = _cpuinfo_flags()
    host = hardware.detect_this_machine().host
    assert hardware.cpu_flags() == expected
    assert host.cpu_flags == expected & hardware.FLAGS_OF_INTEREST
    formats = set(host.cpu_native_formats)
    assert ("int8" in formats) == bool(expected & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
    assert ("bf16" in formats) == bool(expected & {"avx512_bf16", "amx_bf16", "bf16"})
    if host.cuda_device_name is None:
        assert hardware.detect_this_machine().native_formats == host.cpu_native_formats


def test_flag_rules():
    assert hardware.cpu_native_formats(frozenset({"avx2", "fma", "f16c"})) == ("fp32", "int4")
    assert "int8" in hardware.cpu_native_formats(frozenset({"avx2", "avx_vnni"}))
    assert "int8" in hardware.cpu_native_formats(frozenset({"asimd", "asimddp"}))
    assert "bf16" in hardware.cpu_native_formats(frozenset({"amx_bf16"}))
    assert hardware.cpu_native_formats(frozenset()) == ("fp32",)


def test_cuda_capability_rules_agree_with_catalog():
    assert set(hardware.cuda_native_formats((7, 5))) == set(hardware.get("t4").native_formats)
    assert set(hardware.cuda_native_formats((8, 0))) == set(hardware.get("a100-sxm-80gb").native_formats)
    assert set(hardware.cuda_native_formats((8, 9))) == set(hardware.get("l4").native_formats)
    assert set(hardware.cuda_native_formats((9, 0))) == set(hardware.get("h100-sxm-80gb").native_formats)
    assert set(hardware.cuda_native_formats((10, 0))) == set(hardware.get("b200-180gb").native_formats)


def test_hardware_is_hashable(entries):
    assert len({hw for hw in entries}) == len(entries)
