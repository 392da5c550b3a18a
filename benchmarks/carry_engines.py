"""Build ``.engines/<engine>/`` from the engines' wheels: the few files the engine-kernel mode loads, for carrying.

    PYTHONPATH=. python benchmarks/carry_engines.py --wheel sglang=/work/wheels/sglang-0.5.23-...whl \\
        --wheel vllm=/work/wheels/vllm-0.33.0-...whl [--out .engines]

From each wheel: the real files kernel/engine_source.py loads (its layout's ``files``), the wheel's
``<engine>-<version>.dist-info/METADATA`` (the version) and the engine's shipped tuned-config folder (the
``*.json`` files the engine would load: run/lookup.py finds them there). A few hundred KB of code and about 2 MB of
configs per engine; nothing of the engine enters the repository (``/.engines/`` is git-excluded). Each folder is
then loaded in a fresh process as a check.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def wanted(name: str, engine: str) -> bool:
    from moe_opt.kernel.engine_layouts import LAYOUTS

    layout = LAYOUTS[engine]
    files = {m.replace(".", "/") + ".py" for m in layout.files}
    if name in files:
        return True
    if name.startswith(f"{engine}-") and name.endswith(".dist-info/METADATA"):
        return True
    return name.startswith(layout.configs_dir + "/configs/") and name.endswith(".json") or (
        engine == "vllm" and name.startswith(layout.configs_dir + "/") and name.endswith(".json"))


def build(engine: str, wheel: Path, out: Path) -> int:
    target = out / engine
    if target.exists():
        shutil.rmtree(target)
    size = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if wanted(info.filename, engine):
                z.extract(info, target)
                size += info.file_size
    check = (f"from moe_opt.kernel.engine_source import load_engine_source as f; s = f({engine!r}, {str(target)!r}); "
             "print(s.version, len(s.loaded), 'files')")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"carry_engines: {target} does not load: {done.stderr.strip().splitlines()[-1]}")
    print(f"{target}: {size / 1e6:.2f} MB; loads: {done.stdout.strip()}")
    return size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheel", action="append", required=True, help="ENGINE=PATH of the engine's wheel")
    p.add_argument("--out", default=".engines")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for item in args.wheel:
        engine, _, path = item.partition("=")
        if engine not in ("sglang", "vllm") or not path:
            raise SystemExit(f"carry_engines: --wheel takes sglang=PATH or vllm=PATH, got {item!r}")
        total += build(engine, Path(path), out)
    print(f"{out}: {total / 1e6:.2f} MB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
