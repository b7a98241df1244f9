"""benchmarks/method_table.py keeps finished rows; a kept row must not stand in for one whose preset changed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))
import method_table  # noqa: E402  (a script folder, not a package)


def _args(work: Path) -> argparse.Namespace:
    return argparse.Namespace(work=work, model="fashion-ddpm", num=4, steps=2, seed=0, preset="fast",
                              sampler="ddim", guidance_scale=3.0, jobs=1)


def test_the_resolved_settings_follow_the_preset_not_the_row_name() -> None:
    auto = method_table.resolved_settings("tfmq:4:8:recon_preset=auto", "fast")
    balanced = method_table.resolved_settings("tfmq:4:8:recon_preset=balanced", "fast")
    assert auto["reconstruction"]["batch_size"] != balanced["reconstruction"]["batch_size"]
    # TIAR's own settings count too: a row that changes only them is another row's settings
    tiar = method_table.resolved_settings("tfmq:4:8:recon_preset=auto,tiar_weight_lr=0.05", "fast")
    assert tiar["tiar_reconstruction"]["weight_lr"] == 0.05 != auto["tiar_reconstruction"]["weight_lr"]
    assert "tiar_reconstruction" not in method_table.resolved_settings("qdiff:4:8:recon_preset=auto", "fast")
    assert method_table.resolved_settings("rtn:4:8", "fast")["config"]["w_bits"] == 4
    assert "reconstruction" not in method_table.resolved_settings("rtn:4:8", "fast")
    assert method_table.resolved_settings("fp", "fast") is None


def test_a_kept_row_is_reused_only_with_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    row = "qdiff:4:8:recon_preset=auto"
    done = tmp_path / "rows" / (method_table.folder_name(row) + ".json")
    done.parent.mkdir()
    settings = method_table.resolved_settings(row, "fast")
    done.write_text(json.dumps({"row": row, "psnr_to_fp": 1.0, "settings": settings}))
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps({"row": row, "psnr_to_fp": 2.0}) + "\n")

    monkeypatch.setattr(method_table.subprocess, "run", fake_run)
    assert method_table.run_worker(row, _args(tmp_path))["psnr_to_fp"] == 1.0 and not calls
    stale = dict(settings, reconstruction=dict(settings["reconstruction"], batch_size=32))
    done.write_text(json.dumps({"row": row, "psnr_to_fp": 1.0, "settings": stale}))
    result = method_table.run_worker(row, _args(tmp_path))
    assert len(calls) == 1 and result["psnr_to_fp"] == 2.0
    assert json.loads(done.read_text())["settings"] == settings
