"""Choose the GPU backend Blender draws with (OpenGL or Vulkan) before `bpy` is imported.

The bpy module fixes its backend when it is imported, to the factory default (OpenGL on Linux): it parses no
command line, so Blender's `--gpu-backend vulkan` has no equivalent, and it reads no user preferences. The
function behind that flag, `GPU_backend_type_selection_set_override`, is still in the module's symbol table
(a local symbol, so not reachable through `dlsym`): the child finds its address in the ELF `.symtab` and calls
it through ctypes, exactly as the command line would, before the first `import bpy`. Whether Blender then runs
the backend asked for is checked after the first render (`gpu.platform.backend_type_get()`); a machine without
a Vulkan driver silently stays on OpenGL, which the supervisor reports as `gpu_backend_unavailable`.

Why bother: on an H100, EEVEE through Vulkan renders about 10-20% more views per second than through OpenGL and
uses a third of the CPU (docs/benchmarks.md).
"""

import ctypes
import importlib.util
import sys

import numpy as np
from elftools.elf.elffile import ELFFile

from render_jobs.protocol import GPU_BACKENDS, GpuBackend

_VULKAN = 1 << 3  # GPU_BACKEND_VULKAN of Blender's GPUBackendType
_OVERRIDE = "_Z39GPU_backend_type_selection_set_override14GPUBackendType"  # void (GPUBackendType)
_ANCHOR = "PyInit_bpy"  # exported, so its run-time address gives the module's load base
_ELF64_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"), ("size", "<u8")])


def select_gpu_backend(backend: GpuBackend) -> None:
    """Make the next `import bpy` start `backend`. OpenGL is bpy's own default, so asking for it changes nothing.

    Raises:
        ValueError: an unknown backend.
        RuntimeError: bpy is already imported, or its module carries no symbol table to find the switch in.
    """
    if backend not in GPU_BACKENDS:
        raise ValueError(f"unknown GPU backend {backend!r}; expected one of {GPU_BACKENDS}")
    if backend == "opengl":
        return
    if "bpy" in sys.modules:
        raise RuntimeError("the GPU backend must be chosen before bpy is imported")
    library = importlib.util.find_spec("bpy").origin
    offsets = _symbol_offsets(library, (_ANCHOR, _OVERRIDE))
    module = ctypes.CDLL(library)  # the same mapping the later `import bpy` reuses
    base = ctypes.cast(module.PyInit_bpy, ctypes.c_void_p).value - offsets[_ANCHOR]
    override = ctypes.CFUNCTYPE(None, ctypes.c_uint)(base + offsets[_OVERRIDE])
    override(_VULKAN)


def _symbol_offsets(library: str, names: tuple[str, ...]) -> dict[str, int]:
    """Link-time addresses of `names` from an ELF file's `.symtab` (vectorized: bpy holds ~400K symbols)."""
    with open(library, "rb") as stream:
        elf = ELFFile(stream)
        if elf.elfclass != 64 or not elf.little_endian:
            raise RuntimeError(f"{library} is not a little-endian 64-bit ELF file")
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise RuntimeError(f"{library} has no symbol table (stripped); cannot select a GPU backend")
        strtab = elf.get_section(symtab["sh_link"]).data()
        symbols = np.frombuffer(symtab.data(), dtype=_ELF64_SYM)
    offsets = {}
    for name in names:
        at = strtab.find(b"\0" + name.encode() + b"\0")
        matches = np.flatnonzero(symbols["name"] == at + 1) if at >= 0 else []
        if len(matches) != 1:
            raise RuntimeError(f"{library}: symbol {name} not found once in .symtab (found {len(matches)})")
        offsets[name] = int(symbols["value"][matches[0]])
    return offsets
