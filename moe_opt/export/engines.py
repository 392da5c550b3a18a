"""Export: write tuned configs as the JSON files SGLang and vLLM load, and read such files back.

A tuned-config file maps batch sizes (as strings) to the six launch parameters. The two engines look for it in
different places, under names that :meth:`ModelSpec.config_file_name` builds:

- SGLang (python/sglang/srt/layers/moe/fused_moe_triton/fused_moe_triton_config.py, get_moe_configs) opens
  ``$SGLANG_MOE_CONFIG_DIR/configs/triton_X_Y_Z/<name>`` for the running Triton, then the other ``triton_*``
  folders, and parses every top-level key with ``int(key)``: its file must hold batch sizes only.
- vLLM (vllm/model_executor/layers/fused_moe/fused_moe.py, get_moe_configs) opens
  ``$VLLM_TUNED_CONFIG_FOLDER/<name>``, pops ``"triton_version"``, then parses the remaining keys with ``int``;
  its tuner (benchmarks/kernels/benchmark_moe.py, save_configs) writes that entry first.

Both tuners write ``json.dump(configs, f, indent=4)`` and a trailing newline; so does this module, through a temp
file and ``os.replace``, so an engine never reads a half-written file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import TuneError
from ..model.spec import ModelSpec
from ..space import PARAM_NAMES, TMA_NAME, Config, ConfigPair, as_config

# SGLang sorts its configs/triton_* folders by the integer parts of the version when it falls back to another
# Triton version, so a folder such as triton_3_5_0+git1a2b would break that lookup for every shape.
_RELEASE_VERSION = re.compile(r"\d+(\.\d+)*")
# A new file gets the mode `open(path, "w")` gives under the usual umask 022; mkstemp alone would give 0600.
_NEW_FILE_MODE = 0o644


def write_sglang(spec: ModelSpec, configs: Mapping[int, Config], output_dir: str | os.PathLike, *,
                 device_name: str, triton_version: str, down: bool = False) -> Path:
    """Write ``output_dir/configs/triton_X_Y_Z/<SGLang name>``, so ``SGLANG_MOE_CONFIG_DIR=output_dir`` finds it.

    The file holds batch-size keys only, sorted numerically, as SGLang's tuner writes it. It replaces an older
    file of the same name atomically; on any failure the older file stays as it was.

    Args:
        spec: the layer shape the configs were tuned for.
        configs: {batch size M: Config}; must not be empty.
        output_dir: the directory to point SGLANG_MOE_CONFIG_DIR at.
        device_name: ``torch.cuda.get_device_name()`` of the tuning GPU.
        triton_version: the Triton release the configs were tuned with, e.g. "3.6.0".
        down: name the file for the down-projection GEMM (``_down.json``).

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> out = Path(tempfile.mkdtemp())
        >>> path = write_sglang(spec, {1: Config(16, 32, 64, 1, 4, 3)}, out, device_name="NVIDIA H100 80GB HBM3",
        ...                     triton_version="3.6.0")
        >>> path.relative_to(out).as_posix()
        'configs/triton_3_6_0/E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json'
    """
    payload = _entries(configs)
    path = _sglang_path(spec, output_dir, device_name, triton_version, down)
    return _write_json_atomic(path, payload)


def write_vllm(spec: ModelSpec, configs: Mapping[int, Config], output_dir: str | os.PathLike, *,
               device_name: str, triton_version: str) -> Path:
    """Write ``output_dir/<vLLM name>`` with a ``"triton_version"`` entry, for ``VLLM_TUNED_CONFIG_FOLDER``.

    vLLM names the block shape without a space and every H200 variant ``NVIDIA_H200``. The file replaces an older
    one atomically; on any failure the older file stays as it was.

    Args:
        spec: the layer shape the configs were tuned for.
        configs: {batch size M: Config}; must not be empty.
        output_dir: the directory to point VLLM_TUNED_CONFIG_FOLDER at.
        device_name: ``torch.cuda.get_device_name()`` of the tuning GPU.
        triton_version: the Triton version the configs were tuned with (stored, not used in the path).

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> path = write_vllm(spec, {1: Config(16, 32, 64, 1, 4, 3)}, tempfile.mkdtemp(),
        ...                   device_name="NVIDIA H200 NVL", triton_version="3.6.0")
        >>> path.name
        'E=8,N=14336,device_name=NVIDIA_H200.json'
        >>> list(json.loads(path.read_text()))
        ['triton_version', '1']
    """
    # vLLM's kernel launch passes a file's entry as Triton kwargs and has no USE_TMA: an unknown keyword there. A
    # config tuned with TMA (SGLang's path) is written without it, the closest config vLLM can run.
    payload = {M: {k: v for k, v in entry.items() if k != TMA_NAME} for M, entry in _entries(configs).items()}
    if not isinstance(triton_version, str) or not triton_version.strip():
        raise TuneError(f"triton_version must be a non-empty string such as '3.6.0', got {triton_version!r}")
    path = _vllm_path(spec, output_dir, device_name)
    return _write_json_atomic(path, {"triton_version": triton_version, **payload})


def write_engine_files(spec: ModelSpec, configs: Mapping[int, Config], output_dir: str | os.PathLike, *,
                       device_name: str, triton_version: str,
                       sglang_pairs: Mapping[int, ConfigPair] | None = None,
                       engines: Sequence[str] = ("sglang", "vllm")) -> tuple[dict[str, Path], list[int]]:
    """Write the engines' files, each merged with the file already there: batch sizes it holds that this call
    has no entry for are kept, so a file is only ever replaced by a whole one.

    Args:
        spec, output_dir, device_name, triton_version: as for :func:`write_sglang`.
        configs: {M: Config}: the best single config of each batch size (vLLM's file, which has one config per
            batch size for both GEMMs; SGLang's too when no pairs are given).
        sglang_pairs: {M: ConfigPair} of a pair tune: SGLang's up file gets each pair's up config and its
            ``_down`` file the down config (same BLOCK_SIZE_M).
        engines: whose files to write ("sglang", "vllm"); a tune for vLLM's launch rules writes vLLM's only.

    Returns:
        ({"sglang": path, "vllm": path[, "sglang_down": path]}, the batch sizes kept from the older files).

    Example:
        >>> import tempfile
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> out, kw = tempfile.mkdtemp(), dict(device_name="NVIDIA H200", triton_version="3.6.0")
        >>> _ = write_engine_files(spec, {1: Config(16, 32, 64, 1, 4, 3)}, out, **kw)
        >>> files, kept = write_engine_files(spec, {64: Config(64, 128, 128, 32, 4, 3)}, out, **kw)
        >>> kept, sorted(load_tuned_configs(files["vllm"]))
        ([1], [1, 64])
    """
    kwargs = dict(device_name=device_name, triton_version=triton_version)
    up = {M: p.up for M, p in sglang_pairs.items()} if sglang_pairs else dict(configs)
    paths = export_paths(spec, output_dir, down=True, **kwargs)
    kept: set[int] = set()
    files: dict[str, Path] = {}
    planned = [("sglang", up, lambda c: write_sglang(spec, c, output_dir, **kwargs)),
               ("vllm", dict(configs), lambda c: write_vllm(spec, c, output_dir, **kwargs))]
    planned = [p for p in planned if p[0] in engines]
    if sglang_pairs and "sglang" in engines:
        planned.append(("sglang_down", {M: p.down for M, p in sglang_pairs.items()},
                        lambda c: write_sglang(spec, c, output_dir, down=True, **kwargs)))
    for kind, entries, write in planned:
        older = _older_entries(paths[kind], entries)
        kept |= set(older)
        files[kind] = write({**older, **entries})
    return files, sorted(kept)


def _older_entries(path: Path, entries: Mapping[int, Config]) -> dict[int, Config]:
    """The entries of an existing file for batch sizes ``entries`` lacks ({} for no file, or an unreadable one,
    which is replaced whole)."""
    if not path.exists():
        return {}
    try:
        return {M: c for M, c in load_tuned_configs(path).items() if M not in entries}
    except TuneError:
        return {}


def load_tuned_configs(path: str | os.PathLike) -> dict[int, Config]:
    """Read a tuned-config file of either engine: {batch size: Config}, sorted by batch size.

    Keys that are not integers (vLLM's ``"triton_version"``) are skipped, as vLLM's loader skips it; keys beyond
    the six inside an entry (ROCm's ``waves_per_eu``) are ignored.

    Raises:
        TuneError: the file cannot be read, is not JSON, is not an object of batch sizes, or has an entry that
            lacks one of the launch parameters.

    Example:
        >>> import tempfile
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> path = write_vllm(spec, {64: Config(64, 128, 128, 32, 4, 3)}, tempfile.mkdtemp(),
        ...                   device_name="NVIDIA H100 80GB HBM3", triton_version="3.6.0")
        >>> load_tuned_configs(path)
        {64: Config(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=32, num_warps=4, num_stages=3)}
    """
    path = Path(path)
    accepted = "a tuned-config file is a JSON object of batch sizes to configs, as SGLang and vLLM write it"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TuneError(f"cannot read tuned-config file {path}: {reason}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TuneError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                        f"{accepted}") from e
    if not isinstance(data, dict):
        raise TuneError(f"{path} holds a JSON {type(data).__name__}, not an object; {accepted}")
    configs: dict[int, Config] = {}
    for key, entry in data.items():
        try:
            batch_size = int(key)
        except ValueError:
            continue  # "triton_version" and other metadata
        if batch_size < 1:
            raise TuneError(f"{path}: batch size {key!r} is not positive; batch sizes are integers >= 1")
        if not isinstance(entry, dict):
            raise TuneError(f"{path}: the entry for batch size {key} is a JSON {type(entry).__name__}, "
                            f"not an object with {', '.join(PARAM_NAMES)}")
        missing = [name for name in PARAM_NAMES[:4] if name not in entry]
        if missing:
            raise TuneError(f"{path}: the entry for batch size {key} lacks {', '.join(missing)}; "
                            f"each entry needs {', '.join(PARAM_NAMES)}")
        try:
            configs[batch_size] = Config.from_dict(entry)
        except (TypeError, ValueError) as e:
            raise TuneError(f"{path}: the entry for batch size {key} is not a valid config: {e}") from e
    if not configs:
        raise TuneError(f"{path} has no batch-size entries; {accepted}")
    return dict(sorted(configs.items()))


def find_tuned_config_files(spec: ModelSpec, device_name: str, search_dirs: Iterable[str | os.PathLike], *,
                            triton_version: str | None = None) -> list[Path]:
    """Existing tuned-config files for this shape and device, to warm-start a tune from.

    In each directory, in the order given, it looks for the SGLang and the vLLM name directly in the directory
    (vLLM's layout, or an SGLang ``triton_*`` folder passed as is), then in ``configs/triton_*/`` (SGLang's
    layout): the folder of ``triton_version`` first, then the others newest first, as SGLang's fallback does.
    Directories that do not exist are skipped; ``_down`` files are not returned.

    Args:
        spec: the shape; a file matches on E, N, dtype, block_shape (and per_channel_quant for SGLang).
        device_name: ``torch.cuda.get_device_name()``; vLLM's ``NVIDIA_H200`` name is tried too.
        search_dirs: directories to look in, e.g. an SGLANG_MOE_CONFIG_DIR and a VLLM_TUNED_CONFIG_FOLDER.
        triton_version: the version whose folder to prefer; by default the installed Triton's.

    Example:
        >>> import tempfile
        >>> spec = ModelSpec.from_shape(num_experts=8, topk=2, hidden_size=4096, intermediate_size=14336)
        >>> out = tempfile.mkdtemp()
        >>> path = write_sglang(spec, {1: Config(16, 32, 64, 1, 4, 3)}, out, device_name="NVIDIA H200",
        ...                     triton_version="3.4.0")
        >>> find_tuned_config_files(spec, "NVIDIA H200", [out]) == [path]
        True
    """
    if isinstance(search_dirs, (str, os.PathLike)):
        search_dirs = [search_dirs]
    _check_device_name(device_name)
    names = list(dict.fromkeys(spec.config_file_name(device_name, engine=e) for e in ("sglang", "vllm")))
    current = triton_version if triton_version is not None else _installed_triton_version()
    found: list[Path] = []
    for directory in map(Path, search_dirs):
        if not directory.is_dir():
            continue
        candidates = [directory / name for name in names]
        for version_dir in _version_dirs(directory / "configs", current):
            candidates += [version_dir / name for name in names]
        for candidate in candidates:
            if candidate.is_file() and candidate not in found:
                found.append(candidate)
    return found


def export_paths(spec: ModelSpec, output_dir: str | os.PathLike, *, device_name: str,
                 triton_version: str, down: bool = False) -> dict[str, Path]:
    """Where :func:`write_sglang` and :func:`write_vllm` would write, keyed "sglang" and "vllm" (with ``down``
    also "sglang_down", SGLang's down-projection file).

    Example:
        >>> spec = ModelSpec.from_shape(num_experts=256, topk=8, hidden_size=7168, intermediate_size=2048,
        ...                             dtype="fp8_w8a8", block_shape=[128, 128], tp_size=8)
        >>> paths = export_paths(spec, "out", device_name="NVIDIA H200", triton_version="3.6.0")
        >>> paths["sglang"].as_posix()
        'out/configs/triton_3_6_0/E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128, 128].json'
        >>> paths["vllm"].as_posix()
        'out/E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json'
    """
    paths = {"sglang": _sglang_path(spec, output_dir, device_name, triton_version, down=False),
             "vllm": _vllm_path(spec, output_dir, device_name)}
    if down:
        paths["sglang_down"] = _sglang_path(spec, output_dir, device_name, triton_version, down=True)
    return paths


def triton_version_dir(triton_version: str) -> str:
    """SGLang's folder name for a Triton version: "3.6.0" -> "triton_3_6_0".

    Example:
        >>> triton_version_dir("3.6.0")
        'triton_3_6_0'
    """
    if not isinstance(triton_version, str) or not _RELEASE_VERSION.fullmatch(triton_version):
        raise TuneError(f"triton_version {triton_version!r} is not a release version of dotted integers; "
                        "pass one such as '3.6.0' (SGLang sorts its configs/triton_* folders by integer parts)")
    return "triton_" + triton_version.replace(".", "_")


def _sglang_path(spec: ModelSpec, output_dir: str | os.PathLike, device_name: str, triton_version: str,
                 down: bool) -> Path:
    _check_device_name(device_name)
    name = spec.config_file_name(device_name, engine="sglang", down=down)
    return Path(output_dir) / "configs" / triton_version_dir(triton_version) / name


def _vllm_path(spec: ModelSpec, output_dir: str | os.PathLike, device_name: str) -> Path:
    _check_device_name(device_name)
    return Path(output_dir) / spec.config_file_name(device_name, engine="vllm")


def _check_device_name(device_name: str) -> None:
    if not isinstance(device_name, str) or not device_name.strip() or "/" in device_name or "\\" in device_name:
        raise TuneError(f"device_name must be a GPU name as torch.cuda.get_device_name() gives it, such as "
                        f"'NVIDIA H100 80GB HBM3', got {device_name!r}")


def _entries(configs: Mapping[int, Config]) -> dict[str, dict[str, int]]:
    """{"M": the six keys (and "USE_TMA": true where tuned so)}, sorted numerically by M, as the engines' tuners
    write them."""
    if not isinstance(configs, Mapping):
        raise TuneError(f"configs must be a mapping of batch size to Config, got {type(configs).__name__}")
    if not configs:
        raise TuneError("configs is empty; a tuned-config file needs at least one batch size -> Config entry "
                        "(an empty file would make SGLang and vLLM silently fall back to their defaults)")
    for batch_size in configs:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise TuneError(f"batch size {batch_size!r} is not a positive integer; configs maps batch sizes "
                            "(ints >= 1) to Configs")
    entries: dict[str, dict[str, int]] = {}
    for batch_size in sorted(configs):
        try:
            entries[str(batch_size)] = as_config(configs[batch_size]).to_dict()
        except (TypeError, ValueError) as e:
            raise TuneError(f"the config for batch size {batch_size} is not a Config: {e}") from e
    return entries


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write payload as the engines' tuners do, through a temp file in the same directory and os.replace."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.is_file() else _NEW_FILE_MODE
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise TuneError(f"cannot write {path}: {e.strerror or e}; choose an output directory you can write to") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=4)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if isinstance(e, OSError):
            raise TuneError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged") from e
        raise
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; platforms that cannot open a directory (Windows) skip this."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _installed_triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_dirs(configs_root: Path, current: str | None) -> list[Path]:
    """The triton_* folders under configs_root: current version first, then newest first (SGLang's order)."""
    if not configs_root.is_dir():
        return []
    folders = [d for d in configs_root.glob("triton_*") if d.is_dir()]
    parts = {d: d.name.removeprefix("triton_").split("_") for d in folders}
    numeric = [d for d in folders if all(p.isdigit() for p in parts[d])]
    ordered = sorted(numeric, key=lambda d: tuple(int(p) for p in parts[d]), reverse=True)
    ordered += sorted((d for d in folders if d not in numeric), key=lambda d: d.name)
    if current is not None:
        current_name = "triton_" + current.replace(".", "_")
        ordered.sort(key=lambda d: d.name != current_name)  # stable: the rest stay newest first
    return ordered
