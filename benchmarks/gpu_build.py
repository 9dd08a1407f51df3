"""Compile one registered Triton build ahead of time for one GPU target, and read what the binary says.

No GPU is needed: ``triton.compile`` emits PTX/cubin (NVIDIA) or amdgcn/hsaco (AMD) for a named target, and the
``ptxas``/``cuobjdump`` shipped inside the triton wheel report registers, spills and the SASS. This module must
run in a process where ``@triton.jit`` made real ``JITFunction``s (``TRITON_INTERPRET=0``); ``benchmarks/static.py``
spawns such a process. Everything here except :func:`compile_build` is pure text parsing and arithmetic.

What the numbers cannot say: anything about time. Registers, spills, shared memory and the instruction mix are
facts of the binary; the occupancy is an estimate from the per-SM limits below, not a measurement.
"""
import collections
import contextlib
import io
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Arch:
    """One GPU target and the per-SM (per-CU) resources the occupancy estimate and the shared-memory check use."""

    backend: str  # "cuda" or "hip"
    target: object  # the GPUTarget arch: an int compute capability or a "gfx..." string
    warp_size: int
    gpu: str
    shared_per_block: int  # bytes one CTA/workgroup may use (opt-in maximum)
    shared_per_sm: int = 0  # bytes per SM (NVIDIA only: the occupancy estimate)
    family: object = None  # the kernels' tile-table family that runs on it (kernels.attention.configs.FAMILIES)
    mma: str = ""  # the tensor-core instructions (a regex on the opcode) an fp16/bf16 dot should compile to


# NVIDIA CUDA C Programming Guide, "Technical Specifications per Compute Capability" (8.0, 9.0, 10.0); AMD CDNA2/3
# ISA guides: 64 KiB of LDS per workgroup on MI200 (gfx90a) and MI300 (gfx942).
# The MMA each target's dots should use: mma.sync (HMMA) on sm_80, wgmma (HGMMA) on sm_90, tcgen05 (UTC*MMA) on
# sm_100, MFMA on AMD. Every AMD target runs the gfx942 tables.
ARCHS = {
    "sm_80": Arch("cuda", 80, 32, "A100", shared_per_block=163 * 1024, shared_per_sm=164 * 1024, family=80,
                  mma=r"HMMA"),
    "sm_90": Arch("cuda", 90, 32, "H100", shared_per_block=227 * 1024, shared_per_sm=228 * 1024, family=90,
                  mma=r"HGMMA"),
    "sm_100": Arch("cuda", 100, 32, "B200", shared_per_block=227 * 1024, shared_per_sm=228 * 1024, family=100,
                   mma=r"UTC\w*MMA"),
    "gfx90a": Arch("hip", "gfx90a", 64, "MI200", shared_per_block=64 * 1024, family="gfx942", mma=r"v_mfma\w*"),
    "gfx942": Arch("hip", "gfx942", 64, "MI300", shared_per_block=64 * 1024, family="gfx942", mma=r"v_mfma\w*"),
}

# Per-SM limits shared by sm_80, sm_90 and sm_100 (the data-centre parts; sm_86/89 differ).
REGISTERS_PER_SM = 65536
SUB_PARTITIONS = 4  # each SM quarter owns a quarter of the register file and the warps placed on it
REGISTER_ALLOCATION_UNIT = 256  # registers are handed to a warp in chunks of 256 (8 per thread)
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
RESERVED_SHARED_PER_CTA = 1024  # sm_80+: the system keeps 1 KB of shared memory per resident CTA

TENSOR_CORE = re.compile(r"^(HMMA|HGMMA|IMMA|IGMMA|QGMMA|UTC\w*MMA)$")
# SASS opcodes worth counting, grouped: global memory, asynchronous copies (cp.async / TMA), shared-memory
# matrix loads, and local memory (which is where spills go).
NOTABLE_SASS = {
    "LDG": r"^LDG$",
    "STG": r"^STG$",
    "LDGSTS": r"^LDGSTS$",
    "TMA": r"^(UTMA\w*|UBLKCP)$",
    "UTMALDG": r"^UTMALDG$",  # TMA's tile loads alone (the group above also counts its stores and descriptor fences)
    "LDSM": r"^LDSM$",
    "LDL": r"^LDL$",
    "STL": r"^STL$",
}


def tool(name: str) -> str:
    """Path of a CUDA binary utility (ptxas, cuobjdump, nvdisasm) shipped inside the installed triton wheel."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}: this triton wheel does not ship the CUDA tools")
    return path


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """Registers, spill stores/loads and stack frame (bytes) of the entry function, from ``ptxas -v`` output.

    The log may also list non-inlined device functions (stack and spill lines, no register line); only the
    entry kernel's block counts.
    """
    entry = re.search(r"Compiling entry function '([^']+)'", log)
    block = entry and re.search(
        rf"Function properties for {re.escape(entry.group(1))}\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
        rf"stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers", log)
    if not block:
        raise ValueError(f"log: no entry function with register/spill lines in the ptxas output:\n{log}")
    stack, stores, loads, registers = (int(g) for g in block.groups())
    return {"registers": registers, "stack": stack, "spill_stores": stores, "spill_loads": loads}


def parse_resource_usage(text: str) -> Dict[str, int]:
    """REG, STACK, SHARED (static, bytes) and LOCAL (bytes) from ``cuobjdump --dump-resource-usage``."""
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise ValueError(f"text: no 'REG:' entry in the cuobjdump resource usage:\n{text}")
    return {key.lower(): int(value) for key, value in found.items()}


def count_sass(sass: str) -> collections.Counter:
    """How often each base opcode (``LDG`` for ``LDG.E.128``) occurs in ``cuobjdump -sass`` output."""
    # An instruction line: /*0a80*/  [@!P0 ]OPCODE.MODIFIERS operands ;
    opcodes = re.findall(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return collections.Counter(opcodes)


def sass_summary(counts: collections.Counter) -> Dict[str, int]:
    """Tensor-core MMA count (HMMA on sm_80, HGMMA on sm_90, UTC*MMA on sm_100) and the notable opcode groups."""
    summary = {"mma": sum(n for op, n in counts.items() if TENSOR_CORE.match(op))}
    summary["mma_ops"] = {op: n for op, n in counts.items() if TENSOR_CORE.match(op)}
    for group, pattern in NOTABLE_SASS.items():
        summary[group] = sum(n for op, n in counts.items() if re.match(pattern, op))
    return summary


def parse_amdgcn(asm: str) -> Dict[str, int]:
    """Register, spill and LDS figures from the kernel metadata of amdgcn assembly, and its ``v_mfma`` count."""
    keys = ("vgpr_count", "sgpr_count", "agpr_count", "vgpr_spill_count", "sgpr_spill_count",
            "group_segment_fixed_size", "private_segment_fixed_size")
    out = {}
    for key in keys:
        match = re.search(rf"^\s*-?\s*\.{key}:\s+(\d+)", asm, re.MULTILINE)
        if match is None:
            raise ValueError(f"asm: no .{key} in the amdgcn metadata")
        out[key] = int(match.group(1))
    mfma = re.findall(r"^\s*(v_mfma\w*)", asm, re.MULTILINE)
    out["mfma"] = len(mfma)
    out["mfma_ops"] = dict(collections.Counter(mfma))
    return out


def occupancy(registers: int, shared: int, num_warps: int, arch: Arch) -> Dict[str, object]:
    """Resident CTAs per SM allowed by registers, shared memory (``shared`` bytes per CTA) and warps; the minimum.

    Registers: a warp gets ``ceil(32 * registers / 256) * 256`` of them from one SM sub-partition's quarter of the
    65,536, so each quarter holds ``floor(16384 / that)`` warps (the CUDA occupancy calculator's rule). Shared
    memory: each CTA also costs 1 KB reserved by the system; a CTA over the per-block limit cannot launch at all.
    """
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps_by_registers = SUB_PARTITIONS * ((REGISTERS_PER_SM // SUB_PARTITIONS) // per_warp)
    limits = {
        "registers": warps_by_registers // num_warps,
        "shared": 0 if shared > arch.shared_per_block else arch.shared_per_sm // (shared + RESERVED_SHARED_PER_CTA),
        "warps": min(MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // num_warps),
    }
    limiter = min(limits, key=limits.get)
    return {"ctas_per_sm": limits[limiter], "limited_by": limiter, "warps_per_sm": limits[limiter] * num_warps}


def _jit_function(fn):
    """The ``JITFunction`` under any ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    import triton

    while not isinstance(fn, triton.runtime.JITFunction):
        if not hasattr(fn, "fn"):
            raise TypeError(f"fn: expected a @triton.jit function (interpreter off), got {type(fn).__name__}")
        fn = fn.fn
    return fn


def _run(tool_name: str, *args: str) -> str:
    return subprocess.run([tool(tool_name), *args], check=True, capture_output=True, text=True).stdout


def compile_build(build, arch: Arch) -> Dict[str, object]:
    """Compile ``build`` (a ``kernels.registry.Build``) for ``arch`` and return its figures (see module doc).

    Always compiles (never a cache hit): the ptxas log (registers, spills) only comes from a real compile, and
    the compile time would otherwise measure a cache lookup. The first compile of a process also pays Triton's
    one-time set-up for the target.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    fn = _jit_function(build.fn)
    params = list(build.signature)
    if params != list(fn.arg_names):
        raise ValueError(f"signature: parameters {params} do not match {fn.__name__}{tuple(fn.arg_names)}")
    attrs = {(params.index(name),): [["tt.divisibility", 16]] for name in build.divisible_by_16}
    source = triton.compiler.ASTSource(fn=fn, signature=dict(build.signature), constexprs=dict(build.constexprs),
                                       attrs=attrs)
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the `ptxas -v` log of the very cubin it builds...
    knobs.compilation.always_compile = True  # ...but only if it builds it: a cache hit (a repeated build) has no log
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=GPUTarget(arch.backend, arch.target, arch.warp_size),
                                options={"num_warps": build.num_warps, "num_stages": build.num_stages})
    record = {"gpu": arch.gpu, "compile_s": round(time.perf_counter() - start, 3),
              "shared_dynamic": kernel.metadata.shared}
    if arch.backend == "hip":
        record.update(parse_amdgcn(kernel.asm["amdgcn"]))
        record["shared"] = record["shared_dynamic"] + record["group_segment_fixed_size"]
        # VGPR spills go to scratch memory, SGPR spills to spare VGPR lanes (or scratch): both count. A count of
        # registers, not bytes.
        record["spills"] = record["vgpr_spill_count"] + record["sgpr_spill_count"]
        record["mma"], record["mma_ops"] = record["mfma"], record.pop("mfma_ops")
    else:
        record.update(parse_ptxas_log(log.getvalue()))
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            dump = _run("cuobjdump", "--dump-resource-usage", "-sass", cubin)  # one call: the tool starts slowly
        usage, sass = parse_resource_usage(dump), count_sass(dump)
        record["local"] = usage.get("local", 0)
        # Triton allocates all its shared memory dynamically. The static section (1 KB on sm_90+, none on sm_80)
        # is the CTA's system reservation, which CUDA counts in the occupancy, not against the per-block limit.
        record["shared_static"] = usage.get("shared", 0)
        record["shared"] = record["shared_dynamic"]
        record["spills"] = record["spill_stores"] + record["spill_loads"]  # bytes
        record.update(sass_summary(sass))
        record.update(occupancy(record["registers"], record["shared"], build.num_warps, arch))
    record["shared_limit"] = arch.shared_per_block
    record["shared_fits"] = record["shared"] <= arch.shared_per_block
    return record


def describe_failure(error: BaseException, limit: int = 2000) -> str:
    """A compile error as one readable string: its type and the tail of its message (ptxas logs are long)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else "..." + text[-limit:]
