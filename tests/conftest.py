"""Test set-up: kernels run on the GPU when one is present, else through Triton's CPU interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here, before moe_opt is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu_only" in item.keywords:
            item.add_marker(skip)


CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by selenium (report and dashboard tests); missing pieces fail with what to
    install rather than skip: CI installs them (.ci/run's APT_PACKAGES)."""
    import shutil
    import tempfile

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed; install the test extra: pip install -e '.[test]'")
    binary = os.environ.get("MOE_OPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail("headless Chromium not found (chromium and chromedriver on PATH); install the Debian packages "
                    "chromium and chromium-driver (.ci/run's APT_PACKAGES does)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="moe-opt-chromium-")
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def screenshot():
    """``screenshot(driver, name)`` saves the whole page (beyond the window) as a PNG test artifact under
    MOE_OPT_ARTIFACTS (default tests/artifacts/) and returns its path."""
    import base64
    from pathlib import Path

    artifacts = Path(os.environ.get("MOE_OPT_ARTIFACTS", Path(__file__).parent / "artifacts"))

    def save(driver, name: str) -> Path:
        artifacts.mkdir(parents=True, exist_ok=True)
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path = artifacts / name
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    return save
