"""Which tuned-config file an engine loads for a shape on a device, found as the engine finds it.

- SGLang (python/sglang/srt/layers/moe/fused_moe_triton/fused_moe_triton_config.py, get_moe_configs): under
  ``$SGLANG_MOE_CONFIG_DIR`` when it is set, else its own package folder, ``configs/triton_X_Y_Z/<name>`` for the
  running Triton, then the other ``triton_*`` folders newest first (export/engines.py, find_tuned_config_files,
  mirrors that order). The name holds E, N, the device and the quantization, not K or topk: DeepSeek-V4-Flash TP8
  (E=256, N=256) gets the file SGLang ships for DeepSeek-V3 without shared-expert fusion, tuned for K=7168.
- vLLM (vllm/model_executor/layers/fused_moe/fused_moe.py, get_moe_configs): ``$VLLM_TUNED_CONFIG_FOLDER/<name>``,
  then its package's ``configs/<name>``.

An engine that is not installed is looked for only in the folders given or named by its variable.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..export.engines import find_tuned_config_files
from ..model.spec import ModelSpec

ENGINES = ("sglang", "vllm")
ENV_VARS = {"sglang": "SGLANG_MOE_CONFIG_DIR", "vllm": "VLLM_TUNED_CONFIG_FOLDER"}
# Where each engine keeps the files it ships, inside its package (newest layout first).
# sglang 0.5.23 ships them under srt/layers/moe/moe_runner/triton_utils/configs/triton_X_Y_Z/ (read from its wheel).
PACKAGE_DIRS = {"sglang": ("srt/layers/moe/moe_runner/triton_utils", "srt/layers/moe/fused_moe_triton",
                           "srt/layers/fused_moe_triton"),
                "vllm": ("model_executor/layers/fused_moe/configs",)}


@dataclass(frozen=True)
class EngineFile:
    """A tuned-config file and how it was found.

    Attributes:
        path: the file.
        engine: "sglang" or "vllm" (whose lookup found it), or "given" (named by the user).
        where: how, in words: "SGLANG_MOE_CONFIG_DIR=/x", "the installed sglang", "--config-dir /x", "given".
        triton_folder: for SGLang's layout, the ``triton_X_Y_Z`` folder it is in, else None.
    """

    path: Path
    engine: str
    where: str
    triton_folder: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path} ({self.where})"


def engine_package_dir(engine: str) -> Path | None:
    """The folder holding the files an installed engine ships, or None (the engine is not installed).

    The package is located, not imported (importing SGLang or vLLM takes seconds and may need a GPU)."""
    try:
        found = importlib.util.find_spec(engine)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(list(found.submodule_search_locations)[0])
    for sub in PACKAGE_DIRS[engine]:
        if (root / sub).is_dir():
            return root / sub
    return None


def _roots(engine: str, config_dirs: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """The folders an engine looks in, in its order, each with how it came to be looked in."""
    roots = [(Path(d), f"--config-dir {d}") for d in config_dirs]
    env = os.environ.get(ENV_VARS[engine])
    if env:
        roots.append((Path(env), f"{ENV_VARS[engine]}={env}"))
    # SGLang's variable replaces its own folder; vLLM falls back to its package after the user's folder.
    if engine == "vllm" or not (env or config_dirs):
        package = engine_package_dir(engine)
        if package is not None:
            roots.append((package, f"the installed {engine}"))
    return roots


def engine_files(spec: ModelSpec, device_name: str, engine: str, *, config_dirs: Sequence[str | os.PathLike] = (),
                 triton_version: str | None = None) -> list[EngineFile]:
    """The files ``engine`` would consider for ``spec`` on ``device_name``, in its order: the first is the one it
    loads. Empty when it finds none (it then runs its default config at every batch size).

    Args:
        spec: the shape; only E, N, the quantization and the block shape make the name.
        device_name: ``torch.cuda.get_device_name()`` of the GPU the engine runs on.
        engine: "sglang" or "vllm".
        config_dirs: folders to look in first, as the engine's variable would make it do.
        triton_version: the running Triton (SGLang prefers its folder); default the installed one.

    Example:
        >>> import tempfile
        >>> from moe_opt.export.engines import write_sglang
        >>> from moe_opt.space import Config
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> out = tempfile.mkdtemp()
        >>> _ = write_sglang(spec, {1: Config(16, 32, 64, 1, 4, 3)}, out, device_name="NVIDIA H200",
        ...                  triton_version="3.4.0")
        >>> [f.triton_folder for f in engine_files(spec, "NVIDIA H200", "sglang", config_dirs=[out],
        ...                                         triton_version="3.6.0")]
        ['triton_3_4_0']
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    name = spec.config_file_name(device_name, engine=engine)
    found: list[EngineFile] = []
    for root, where in _roots(engine, config_dirs):
        if engine == "sglang":
            for path in find_tuned_config_files(spec, device_name, [root], triton_version=triton_version):
                if path.name == name and path.parent.parent == root / "configs":
                    found.append(EngineFile(path, engine, where, path.parent.name))
        elif (root / name).is_file():
            found.append(EngineFile(root / name, engine, where))
    return list({f.path: f for f in found}.values())


def files_in(paths: Iterable[str | os.PathLike], spec: ModelSpec, device_name: str, *,
             triton_version: str | None = None) -> list[EngineFile]:
    """The files named by the user: a file as it is; a folder laid out for SGLang (``configs/triton_X_Y_Z/``) or
    vLLM: the files for this shape and device in it, SGLang's lookup order first."""
    from ..errors import TuneError

    out: list[EngineFile] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(EngineFile(p, "given", "given"))
        elif p.is_dir():
            hits = find_tuned_config_files(spec, device_name, [p], triton_version=triton_version)
            if not hits:
                names = {spec.config_file_name(device_name, engine=e) for e in ENGINES}
                raise TuneError(f"folder {p} holds no tuned-config file for this shape on {device_name}; looked for "
                                f"{' and '.join(sorted(names))} in it and in its configs/triton_*/ folders")
            out += [EngineFile(h, "given", f"in {p}", h.parent.name if h.parent.name.startswith("triton_") else None)
                    for h in hits]
        else:
            raise TuneError(f"config {p}: no such file or folder; give a tuned-config file or a folder laid out "
                            "for SGLang (configs/triton_X_Y_Z/) or vLLM")
    return out
