"""The INT8 scheme a CPU computes exactly and fast with ONNX Runtime's integer kernels: a fact about the
machine (or the hardware profile's device, or the CPU ``COMPRESS_ISA`` forces), which every
quantization pass with ``scheme = "auto"``, ``compress targets`` and the profiles share."""

from __future__ import annotations

from .fingerprint import active_profile, cpu_info

# x86 flags whose u8 x s8 dot products accumulate in 32 bits (no VPMADDUBSW saturation).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")


def choose_scheme(requested: str) -> tuple[str, str]:
    """Resolve ``scheme="auto"`` from this CPU's ISA; return (scheme, why).

    The ISA is :func:`compress.core.fingerprint.cpu_info`'s, so ``COMPRESS_ISA`` / ``COMPRESS_ARCH`` force
    either branch on any machine (the tests run both).
    """
    info = cpu_info()
    isa, arch = info["isa"], str(info["arch"]).lower()
    forced = f" (forced by {info.get('isa_forced_by')}; detected: {', '.join(info['isa_detected']) or 'none'})" \
        if info["isa_forced"] else ""
    if requested != "auto":
        return requested, f"scheme {requested} set by the user (CPU ISA: {', '.join(isa) or 'unknown'}{forced})"
    profile = active_profile()
    if profile is not None and profile.int8_scheme:
        # The profile's scheme was checked against its ISA when it was loaded (compress.stages.profiles).
        return profile.int8_scheme, (f"{profile.int8_scheme}: preferred by hardware profile {profile.name} "
                                     f"(ISA {', '.join(isa) or 'none'}, {arch})")
    return scheme_for_isa(isa, arch, forced)


def scheme_for_isa(isa: list[str], arch: str, forced: str = "") -> tuple[str, str]:
    """The INT8 scheme ONNX Runtime's kernels compute exactly and fast on a CPU with ``isa``; (scheme, why)."""
    vnni = [f for f in VNNI_FLAGS if f in isa]
    if arch not in ("x86_64", "amd64"):
        return "u8s8", f"u8s8: {arch} CPU; ONNX Runtime's integer kernels there do not use VPMADDUBSW{forced}"
    if vnni:
        return "u8s8", (f"u8s8: this CPU has {', '.join(vnni)}, whose u8 x s8 dot products accumulate in 32 bits "
                        f"(no saturation), and U8S8 is ONNX Runtime's fast x86 path{forced}")
    return "u8s8_reduce_range", (
        "u8s8 with 7-bit weights (reduce_range): this CPU has no VNNI, so ONNX Runtime's u8 x s8 kernels use "
        "VPMADDUBSW, whose 16-bit pair sums saturate with full 8-bit weights (255*127*2 > 32767); 7-bit weights "
        f"keep them in range (255*64*2 < 32767) at U8S8 speed. S8S8 was slower than FP32 on such a CPU{forced}")
