"""kvtier's small C helpers (``csrc/``), compiled on first use with the system C compiler into
``~/.cache/kvtier/`` and named by the source's digest (an edited source is rebuilt).

Every helper is optional: where there is no compiler, no headers or another byte order,
:func:`build` returns None and the caller runs its Python implementation, which gives the same
results (each helper's tests compare the two).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

from kvtier.config import default_cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def build(source_name: str, library_stem: str, flags: list[str], libraries: list[str] = ()) -> Path | None:
    """The shared library built from ``csrc/<source_name>``, building it if needed; None where it
    cannot be built (the reason is logged at debug level)."""
    source = CSRC / source_name
    if sys.byteorder != "little" or not source.exists():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    library = default_cache_dir() / f"{library_stem}-{digest}.so"
    if library.exists():
        return library
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
            built = Path(tmp) / library.name
            command = [compiler, "-O2", "-shared", "-fPIC", *flags, str(source), "-o", str(built), *(f"-l{lib}" for lib in libraries)]
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                log.debug("%s did not build (%s); using Python", source_name, result.stderr.strip()[:500])
                return None
            os.replace(built, library)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s is unavailable (%s); using Python", source_name, exc)
        return None
    return library


def load_extension(source_name: str, module_name: str) -> ModuleType | None:
    """A CPython extension module built from ``csrc/<source_name>`` against this interpreter's
    headers, imported as ``module_name``; None where it cannot be built or loaded."""
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        return None
    tag = sys.implementation.cache_tag  # one build per interpreter version
    library = build(source_name, f"{module_name}-{tag}", [f"-I{include}"])
    if library is None:
        return None
    try:
        loader = importlib.machinery.ExtensionFileLoader(module_name, str(library))
        spec = importlib.util.spec_from_file_location(module_name, str(library), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except (ImportError, OSError) as exc:
        log.debug("%s did not load (%s); using Python", library, exc)
        return None
    return module
