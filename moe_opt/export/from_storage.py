"""Rebuild config files from a study storage alone (``moe-opt export STORAGE``), through the one ranking."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import TuneError
from ..space import Config
from ..store.identity import StudyInfo, list_moe_studies
from ..store.results import study_result
from ..store.storage import open_storage
from .engines import write_engine_files


def best_config(storage, info: StudyInfo) -> tuple[Config, float] | None:
    """The result of one study (store/results.py: re-measured medians, guard verdicts honoured), or None."""
    import optuna

    best = study_result(optuna.load_study(study_name=info.name, storage=storage)).best
    return (best.config, best.latency_us) if best is not None else None


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
        configs = {info.M: found[0] for info in infos if (found := best_config(storage, info)) is not None}
        if not configs:
            continue
        files, _ = write_engine_files(spec, configs, output_dir, device_name=infos[0].device_name,
                                      triton_version=infos[0].triton_version)
        written += [files["sglang"], files["vllm"]]
    return written
