"""What `ray job submit --working-dir .` uploads from a checkout (Ray's own packaging code, .gitignore applied):
every tracked file, no virtualenv or run output, well under Ray's size limit."""

import subprocess
import zipfile
from pathlib import Path

from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

ROOT = Path(__file__).resolve().parents[2]


def test_working_dir_package_holds_the_code_and_not_the_venv(tmp_path):
    (ROOT / "runs").mkdir(exist_ok=True)  # a run's output folder in the checkout is never uploaded
    marker = ROOT / "runs" / "_package_test_marker.txt"
    marker.write_text("x")
    try:
        create_package(str(ROOT), tmp_path / "pkg.zip", include_gitignore=True)
    finally:
        marker.unlink()
    names = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in tracked if f not in names and (ROOT / f).exists()]
    assert missing == [] and "jobs/train.py" in names and "mimo_ray/driver/train_loop.py" in names
    assert not [n for n in names if n.startswith((".venv/", "runs/")) or "/__pycache__/" in n]
    assert (tmp_path / "pkg.zip").stat().st_size < GCS_STORAGE_MAX_SIZE / 8
