"""Rebuild config files from a study storage alone (``moe-opt export STORAGE``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .errors import TuneError
from .space import PARAM_NAMES, Config
from .study import StudyInfo, confirmed_latencies, latency_of, list_moe_studies, open_storage


def best_configs(storage, info: StudyInfo) -> tuple[Config, float] | None:
    """The fastest completed config of one study (by re-measured medians where the tune made them) that the
    correctness guard did not reject, or None."""
    study = optuna.load_study(study_name=info.name, storage=storage)
    attrs = study.user_attrs
    rejected = {int(n) for n, outcome in (attrs.get("guard") or {}).items() if str(outcome).startswith("failed")}
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number not in rejected]
    if not complete:
        return None
    confirmed = confirmed_latencies(attrs)
    top = min(complete, key=lambda t: latency_of(t, confirmed))
    return Config(*(int(top.params[p]) for p in PARAM_NAMES)), latency_of(top, confirmed)


def export_storage(storage_url, output_dir) -> list[Path]:
    """Write SGLang and vLLM files for every shape/device found in the storage; returns the paths written.

    Example:
        >>> export_storage("sqlite:///studies/DeepSeek-V4-Flash.db", "moe_configs")  # doctest: +SKIP
    """
    from .export import write_sglang, write_vllm

    storage = open_storage(storage_url)
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
        configs = {}
        for info in infos:
            found = best_configs(storage, info)
            if found is not None:
                configs[info.M] = found[0]
        if not configs:
            continue
        kwargs = dict(device_name=infos[0].device_name, triton_version=infos[0].triton_version)
        written.append(write_sglang(spec, configs, output_dir, **kwargs))
        written.append(write_vllm(spec, configs, output_dir, **kwargs))
    return written
