"""``opd-jax train`` in a multi-process run: only process 0 deletes (``--fresh``) the shared run
directory and writes the report; the others run the same stages and stay silent."""

import pytest

TINY = "configs/tiny_test.yaml"


@pytest.mark.parametrize("primary", [True, False])
def test_train_writes_report_and_deletes_run_dir_only_on_process_0(monkeypatch, tmp_path, capsys,
                                                                   primary):
    from opd_jax import analyze, cli
    from opd_jax.train import distributed as mesh_lib
    from opd_jax.train import run as run_mod

    ran, reports = [], []
    monkeypatch.setattr(run_mod, "run", lambda cfg, progress=True: ran.append(cfg.run_dir) or {
        "run_dir": str(cfg.run_dir), "evals": {}, "stages": {}})
    monkeypatch.setattr(analyze, "write_report", lambda d: reports.append(d) or f"{d}/summary.md")
    monkeypatch.setattr(mesh_lib, "is_primary", lambda: primary)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "old_metrics.jsonl").write_text("{}\n")

    assert cli.main(["train", TINY, f"out_dir={run_dir}", "--fresh", "--no-progress"]) == 0
    assert ran == [run_dir]                          # every process trains
    assert reports == ([run_dir] if primary else [])
    assert (run_dir / "old_metrics.jsonl").exists() is not primary
    assert ("report:" in capsys.readouterr().out) is primary
