"""Load an engine's own Triton fused-MoE kernel and launch function from its source files, without the engine.

SGLang's and vLLM's full ``fused_experts`` cannot run where the engine is not installed with its compiled ops
(docs/engines.md: the import errors and the ops each path needs), but the GEMM kernel and the Python function
that launches it are plain ``@triton.jit`` code. This module loads exactly those files from a source folder (the
engine's wheel, unpacked: benchmarks/carry_engines.py) under their own module names, so Triton compiles the
engine's own code. What those files import is satisfied in one of three declared ways, and nothing else of the
engine is imported (an import not declared in the layout, kernel/engine_layouts.py, is an ImportError naming it):

- ``files``: further real files of the engine, loaded as they are (stdlib-only helpers: env lookups, math).
- packages above those: their ``__init__.py`` is not run (it imports the whole serving stack); an empty package
  module stands for each, so the listed submodules can load.
- ``replaced``: modules that stand in for platform probes, logging, env/server-flag lookups and custom-op
  registration (each answers as the engine does on a CUDA device with default settings), or for functions on
  paths these launches never take (each raises if called, naming what was not carried).

The kernel code itself is never replaced or edited; ``EngineSource.record()`` says what was loaded and what was
replaced, and benchmarks write it into their results.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("sglang", "vllm")


class _NotCarried:
    """Stands for a function or value on a path the engine-kernel launches never take: calling it, or anything
    reached from it, raises. A class (not an instance) so that annotations such as ``X | None`` still evaluate."""


def not_carried(name: str) -> type:
    """A placeholder for ``name``: attribute access gives further placeholders; calling raises RuntimeError."""

    class Meta(type):
        def __getattr__(cls, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return not_carried(f"{name}.{attr}")

        def __call__(cls, *args, **kwargs):
            raise RuntimeError(f"{name} is not carried (engine_source replaced it: only the engine's Triton GEMM "
                               "launch runs here)")

    return Meta(name.rsplit(".", 1)[-1], (_NotCarried,), {"__qualname__": name})


# --- A layout (kernel/engine_layouts.py holds SGLang's and vLLM's) and its loader -------------------------------

@dataclass(frozen=True)
class Replacement:
    """A module that stands in for one the engine's files import: its attributes and why that is safe."""

    module: str
    attrs: dict[str, Any]
    why: str


@dataclass(frozen=True)
class EngineLayout:
    """What to load of one engine: real files (module names), replaced modules, the module holding the GEMM
    launch and the one holding the default config, where the shipped configs live. The packages above them are
    not initialized (all_packages)."""

    engine: str
    files: tuple[str, ...]
    replaced: tuple[Replacement, ...]
    launch: str  # "module:function"
    default_config: str  # "module:function"
    configs_dir: str  # relative to the source folder (the shipped tuned files)

    def all_packages(self) -> tuple[str, ...]:
        """Every package above a loaded file or a replaced module: their ``__init__.py`` is not run."""
        names = set()
        for module in self.files + tuple(r.module for r in self.replaced):
            parts = module.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts)))
        return tuple(sorted(names))


def _attr(value: Any) -> Any:
    """Replacement values given as "module" strings are that installed module (triton)."""
    return importlib.import_module(value) if isinstance(value, str) else value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the layout's modules from ``root`` (files), empty packages and replacement modules; refuses every
    other module of the engine."""

    def __init__(self, layout: EngineLayout, root: Path):
        self.layout, self.root = layout, root
        self.replaced = {r.module: r for r in layout.replaced}
        self.packages = layout.all_packages()
        self.loaded: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        top = self.layout.engine
        if fullname != top and not fullname.startswith(top + "."):
            return None
        if fullname in self.layout.files:
            file = self.root / (fullname.replace(".", "/") + ".py")
            if not file.is_file():
                raise ImportError(f"{file} is missing (the source folder lacks a file the kernel needs: rebuild it "
                                  "with benchmarks/carry_engines.py)", name=fullname)
            self.loaded.append(str(file.relative_to(self.root)))
            return importlib.util.spec_from_file_location(fullname, file)
        if fullname in self.packages or fullname in self.replaced:
            spec = importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in self.packages)
            if spec.submodule_search_locations is not None and fullname not in self.replaced:
                spec.submodule_search_locations.append(str(self.root / fullname.replace(".", "/")))
            return spec
        raise ImportError(f"{fullname} is imported by the {top} kernel files but neither carried nor replaced "
                          "(moe_opt/kernel/engine_source.py declares both)", name=fullname)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        r = self.replaced.get(module.__name__)
        if r is not None:
            module.__dict__.update({k: _attr(v) for k, v in r.attrs.items()})
            if not r.attrs:  # a module only used on paths not run: any name is a placeholder that raises if used
                module.__getattr__ = lambda attr, _m=module.__name__: not_carried(f"{_m}.{attr}")


@dataclass
class EngineSource:
    """An engine's kernel files, loaded: the launch function, the default-config function, the version.

    Attributes:
        layout: what was loaded (its engine: "sglang" or "vllm").
        root: the source folder.
        version: from the folder's ``<engine>-<version>.dist-info`` (the wheel's METADATA).
        launch: the engine's GEMM launch (SGLang ``invoke_fused_moe_kernel``, vLLM
            ``invoke_fused_moe_triton_kernel``).
        default_config: the engine's ``get_default_config``.
        loaded: the real files loaded, relative to root.
    """

    layout: EngineLayout
    root: Path
    version: str
    launch: Callable
    default_config: Callable
    loaded: list[str] = field(default_factory=list)

    @property
    def engine(self) -> str:
        return self.layout.engine

    @property
    def configs_dir(self) -> Path:
        return self.root / self.layout.configs_dir

    def record(self) -> dict:
        """What ran and what stood in for what: for results files."""
        lay = self.layout
        return {"engine": self.engine, "version": self.version, "source": str(self.root),
                "launch": lay.launch, "default_config": lay.default_config, "files_loaded": self.loaded,
                "packages_not_initialized": list(lay.all_packages()),
                "replaced_imports": {r.module: {"names": sorted(r.attrs) or ["(any: raises if used)"],
                                                "why": r.why} for r in lay.replaced}}


def source_version(engine: str, root: Path) -> str:
    """The engine's version, from ``<engine>-<version>.dist-info`` in ``root``."""
    found = [m.group(1) for p in root.glob(f"{engine}-*.dist-info") if (m := re.match(rf"{engine}-(.+)\.dist-info$",
                                                                                       p.name))]
    if len(found) != 1:
        raise ImportError(f"{root} must hold exactly one {engine}-<version>.dist-info (the wheel's metadata), "
                          f"found {len(found)}")
    return found[0]


@functools.cache
def load_engine_source(engine: str, source: str | os.PathLike) -> EngineSource:
    """Load ``engine``'s kernel files from ``source`` (a folder holding ``<engine>/...`` and its dist-info).

    Raises ImportError (one line) when a file is missing, the folder is not such a folder, an import is neither
    carried nor replaced, or the engine is already imported in this process (its modules would mix with these).

    Example:
        >>> src = load_engine_source("sglang", ".engines/sglang")  # doctest: +SKIP
        >>> src.version, src.launch.__name__  # doctest: +SKIP
        ('0.5.23', 'invoke_fused_moe_kernel')
    """
    from .engine_layouts import LAYOUTS

    if engine not in LAYOUTS:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return load_source(LAYOUTS[engine], source)


def load_source(layout: EngineLayout, source: str | os.PathLike) -> EngineSource:
    """Load what ``layout`` names from ``source`` (load_engine_source for SGLang's and vLLM's layouts)."""
    engine = layout.engine
    root = Path(source).resolve()
    if not (root / engine).is_dir():
        raise ImportError(f"{root} has no {engine}/ folder (build it with benchmarks/carry_engines.py)")
    version = source_version(engine, root)
    clash = [m for m in sys.modules if m == engine or m.startswith(engine + ".")]
    if clash:
        raise ImportError(f"{engine} is already imported here ({clash[0]}): load its kernel files in a process "
                          "without it")
    finder = _Finder(layout, root)
    sys.meta_path.insert(0, finder)
    try:
        found = {}
        for key in ("launch", "default_config"):
            module, attr = getattr(layout, key).split(":")
            found[key] = getattr(importlib.import_module(module), attr)
    except BaseException:
        for m in [m for m in sys.modules if m == engine or m.startswith(engine + ".")]:
            del sys.modules[m]
        raise
    finally:
        sys.meta_path.remove(finder)
    return EngineSource(layout, root, version, found["launch"], found["default_config"], finder.loaded)
