"""Laying out Triton's python backend (server/launcher/distribution.py) without a Triton."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from server.launcher.distribution import BACKEND_FILES, STUB_NAME, TritonDistribution


def test_backends_can_be_laid_out_again_while_the_old_stub_still_runs(tmp_path: Path):
    """A killed Triton's python stub may outlive it; restarting the replica lays out the
    backend again over that running executable (the soak's restart once failed: ETXTBSY)."""
    source = tmp_path / "wheel"
    source.mkdir()
    for name in BACKEND_FILES:
        (source / name).write_text(name)
    stub = source / STUB_NAME
    shutil.copy2(shutil.which("sleep"), stub)
    dist = TritonDistribution(source / "tritonserver", source, source, stub)
    target = dist.prepare_backends(tmp_path / "backends")
    running = subprocess.Popen([str(target / "python" / STUB_NAME), "30"])
    try:
        dist.prepare_backends(target)  # over the busy stub
        assert (target / "python" / STUB_NAME).read_bytes() == stub.read_bytes()
        assert running.poll() is None  # the old one keeps running
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in (target / "python").iterdir()) == sorted(
        [*BACKEND_FILES, STUB_NAME]
    )
