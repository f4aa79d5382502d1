"""The kernel-generation core (compiler/kernelgen): specs, rendering, headers, build."""

from __future__ import annotations

import shutil

import jinja2
import pytest

from qcompile.errors import TargetError
from qcompile.kernelgen import KernelSpec, manifest
from qcompile.kernelgen import build as kbuild
from qcompile.kernelgen import ort_headers
from qcompile.backends.cpu.generated_kernels import TEMPLATES
from qcompile.kernelgen.render import environment, render_sources, served_ops


def spec(k=64, n=32, isa="avx512_vnni") -> KernelSpec:
    return KernelSpec(op="QMatMulPerToken", family="cpu", isa=isa,
                      dtypes=(("activation", "int8"), ("weight", "int8")),
                      static_dims=(("K", k), ("N", n)), dynamic_dims=("M",),
                      scale_layout="per_token x per_channel", epilogue="bias")


def test_spec_id_is_a_content_hash():
    assert spec().id == spec().id and len(spec().id) == 12
    ids = {spec(64, 32).id, spec(32, 64).id, spec(64, 32, "avx2").id}
    assert len(ids) == 3
    assert spec().symbol == f"QMatMulPerToken_{spec().id}"
    assert KernelSpec.from_dict(spec(37, 70).to_dict()) == spec(37, 70)      # a manifest entry round-trips


def test_manifest_lists_each_spec_once_with_its_layers():
    a, b = spec(64, 32), spec(16, 8)
    doc = manifest([b, a], layers={a.id: ["l2", "l1"]}, library="lib.so", build={"cached": True})
    assert [k["id"] for k in doc["kernels"]] == sorted([a.id, b.id])  # same op: by id
    entry = next(k for k in doc["kernels"] if k["id"] == a.id)
    assert entry["layers"] == ["l1", "l2"] and entry["spec"]["static_dims"] == {"K": 64, "N": 32}
    assert doc["domain"] == "com.qcompile"


def test_rendering_is_deterministic_and_names_its_spec():
    one = render_sources(TEMPLATES, [spec(64, 32), spec(16, 8)], "9.9")
    two = render_sources(TEMPLATES, [spec(16, 8), spec(64, 32), spec(16, 8)], "9.9")
    assert one == two                                    # order and duplicates do not matter
    text = one[f"{spec(64, 32).symbol}.cpp"]
    assert "qcompile 9.9" in text and spec(64, 32).id in text
    assert "constexpr int64_t K = 64;" in text and "constexpr int64_t N = 32;" in text
    assert "QMatMulPerToken" in served_ops(TEMPLATES)
    assert set(one) == {f"{spec(64, 32).symbol}.cpp", f"{spec(16, 8).symbol}.cpp", "register.cpp",
                        "qcompile_kernels.h"}


def test_isa_decides_which_vector_paths_are_emitted():
    vnni = render_sources(TEMPLATES, [spec(isa="avx512_vnni")], "x")[f"{spec(isa='avx512_vnni').symbol}.cpp"]
    avx2 = render_sources(TEMPLATES, [spec(isa="avx2")], "x")[f"{spec(isa='avx2').symbol}.cpp"]
    generic = render_sources(TEMPLATES, [spec(isa="generic")], "x")[f"{spec(isa='generic').symbol}.cpp"]
    assert "_mm512_dpbusd_epi32" in vnni and "_mm256_madd_epi16" in vnni
    assert "_mm512_dpbusd_epi32" not in avx2 and "_mm256_madd_epi16" in avx2
    assert "immintrin" not in generic and "run_scalar" in generic


def test_templates_see_nothing_but_their_spec():
    with pytest.raises(jinja2.UndefinedError):
        environment(TEMPLATES).from_string("{{ not_in_the_spec }}").render(spec=spec())


def test_ort_include_dir_without_headers_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(TargetError, match="holds no onnxruntime C API headers.*onnxruntime_c_api.h"):
        ort_headers.find_headers()


def test_headers_newer_than_the_runtime_are_refused(tmp_path, monkeypatch):
    real = ort_headers.find_headers().include_dir
    newer = tmp_path / "include"
    shutil.copytree(real, newer)
    c_api = newer / "onnxruntime_c_api.h"
    text = c_api.read_text()
    c_api.write_text(text.replace(f"#define ORT_API_VERSION {ort_headers.api_version_of(real)}",
                                  "#define ORT_API_VERSION 99"))
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(newer))
    runtime = ort_headers.runtime_api_version()
    with pytest.raises(TargetError, match=f"API version 99, newer than the installed onnxruntime .*API version {runtime}"):
        ort_headers.find_headers()


def test_pinned_headers_match_the_runtime():
    headers = ort_headers.find_headers()
    assert headers.api_version <= ort_headers.runtime_api_version()
    assert all((headers.include_dir / h).is_file() for h in ort_headers.REQUIRED)


def test_deb_unpacking_reads_an_ar_archive():
    payload = b"hello"
    archive = b"!<arch>\n" + b"data.tar.xz/".ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + \
        b"100644".ljust(8) + str(len(payload)).encode().ljust(10) + b"`\n" + payload
    assert ort_headers._ar_member(archive, "data.tar.xz") == payload
    with pytest.raises(ort_headers.HeadersUnavailable):
        ort_headers._ar_member(b"not an archive", "data.tar.xz")


def test_build_is_cached_and_a_compiler_error_names_its_source(tmp_path, monkeypatch):
    headers = ort_headers.find_headers()          # before the cache moves: the pinned headers
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    sources = render_sources(TEMPLATES, [spec(8, 8)], "t")
    first = kbuild.build(sources, headers)
    again = kbuild.build(sources, headers)
    assert not first.cached and again.cached and again.path == first.path and first.path.stat().st_size > 0
    broken = dict(sources, **{"register.cpp": sources["register.cpp"] + "\nthis is not C++;\n"})
    with pytest.raises(kbuild.BuildFailed, match=r"(?s)failed on the generated kernels \(sources kept in .*\).*error"):
        kbuild.build(broken, headers)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(kbuild.BuildFailed, match="no C\\+\\+ compiler"):
        kbuild.build(sources, headers)


def test_cmakelists_names_every_unit():
    sources = render_sources(TEMPLATES, [spec(8, 8)], "t")
    text = kbuild.cmakelists(sources)
    assert all(name in text for name in sources if name.endswith(".cpp"))
    assert "ORT_API_MANUAL_INIT" in text and "ORT_INCLUDE_DIR" in text
