"""torch_dist checkpoints move between Megatron-Core releases and between our MTP and Megatron-Core's own.

Each save and load runs in a fresh interpreter (``checkpoint_worker.py``): this suite's, and the other release's
named in ``MEGATRON_MTP_TEST_PYTHONS`` (colon-separated interpreters; ``tools/run_tests.sh`` sets it). A loaded
model must give the saved model's main and per-depth losses on the same batch. The test runs in the suite of the
newest release only (it would repeat the same subprocesses in the other).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.version import Version

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def _run(python: str, *args: str) -> dict:
    result = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"{python} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _interpreters_by_release() -> dict:
    pythons = [sys.executable] + [p for p in os.environ.get("MEGATRON_MTP_TEST_PYTHONS", "").split(":") if p]
    by_release = {}
    for python in pythons:
        release = subprocess.run(  # the installed distribution's version: no import of Megatron-Core (seconds)
            [python, "-c", "from importlib.metadata import version; print(version('megatron-core').split('+')[0])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        by_release.setdefault(release, python)
    return by_release


def _assert_same_losses(loaded: dict, saved: dict, what: str) -> None:
    assert loaded["main"] == pytest.approx(saved["main"], abs=1e-6), what
    assert loaded["depths"] == pytest.approx(saved["depths"], abs=1e-5), what


def test_checkpoints_load_across_releases_and_into_megatron_core_mtp():
    by_release = _interpreters_by_release()
    if len(by_release) < 2:
        message = f"needs interpreters of two Megatron-Core releases (MEGATRON_MTP_TEST_PYTHONS); found {by_release}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    releases = sorted(by_release, key=Version)
    if by_release[releases[-1]] != sys.executable:
        pytest.skip(f"runs in the megatron-core {releases[-1]} suite")
    with tempfile.TemporaryDirectory() as root:
        for mode in ("sequential", "parallel"):
            for saver in releases:
                directory = os.path.join(root, f"{mode}-{saver}")
                saved = _run(by_release[saver], "save", directory, mode)
                for loader in releases:
                    if loader != saver:  # same-release loads: tests/distributed/test_checkpoint_roundtrip.py
                        loaded = _run(by_release[loader], "load", directory, mode)
                        assert loaded["version"].startswith(loader)
                        _assert_same_losses(loaded, saved, f"{mode}: saved by {saver}, loaded by {loader}")
                    if mode == "sequential":
                        reference = _run(by_release[loader], "load-megatron", directory)
                        _assert_same_losses(reference, saved, f"Megatron-Core {loader}'s MTP loading ours ({saver})")
