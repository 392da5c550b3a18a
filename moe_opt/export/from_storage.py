"""Rebuild config files from a study storage alone (``moe-opt export STORAGE``), through the one ranking."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import TuneError
from ..space import Config, ConfigPair
from ..store.identity import StudyInfo, list_moe_studies
from ..store.results import study_result
from ..store.storage import open_storage
from .engines import write_engine_files


def study_export(storage, info: StudyInfo) -> tuple[Config, ConfigPair | None] | None:
    """What one study exports (store/results.py: re-measured medians, guard verdicts honoured): its best single
    config and, for a pair study, SGLang's pair; None without a result."""
    import optuna

    result = study_result(optuna.load_study(study_name=info.name, storage=storage))
    if result.best is None:
        return None
    return result.best.config, result.engine_pair[0] if info.attrs.get("pair") else None


def export_storage(storage_url, output_dir) -> list[Path]:
    """Write SGLang and vLLM files for every shape/device found in the storage, merged with the files already in
    ``output_dir`` (batch sizes they hold that the storage has no result for are kept); returns the paths written.

    Example:
        >>> export_storage("sqlite:///studies/DeepSeek-V4-Flash.db", "moe_configs")  # doctest: +SKIP
    """
    storage = open_storage(storage_url, create=False)
    groups: dict[str, list[StudyInfo]] = defaultdict(list)
    for info in list_moe_studies(storage):
        groups[info.base].append(info)
    if not groups:
        raise TuneError(f"storage {storage_url} holds no moe_opt studies; run moe-opt tune first")
    written = []
    for base, infos in groups.items():
        spec = infos[0].spec
        if spec is None:
            print(f"moe-opt export: skipping {base}: its studies record no model spec (replay without a spec)")
            continue
        found = {info.M: f for info in infos if (f := study_export(storage, info)) is not None}
        if not found:
            continue
        pairs = {M: pair for M, (_, pair) in found.items() if pair is not None}
        files, _ = write_engine_files(spec, {M: c for M, (c, _) in found.items()}, output_dir,
                                      device_name=infos[0].device_name, triton_version=infos[0].triton_version,
                                      sglang_pairs=pairs or None)
        written += list(files.values())
    return written
