"""`fastdino plot`: a PNG from a synthetic log.jsonl, panels without data skipped, clear errors."""
import json
import math

import pytest

from fastdino.cli import main
from fastdino.eval.plot import PANELS, plot_run, read_log

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, steps=60, with_eval=True, with_monitor=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    log_k = math.log(64)
    lines = []
    for step in range(steps):
        record = {"step": step, "epoch": step // 20, "loss": log_k - step / steps, "lr": 1e-4 * step / steps,
                  "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04, "img_per_s": 100.0 + step % 7}
        if with_monitor:
            record.update(log_k=log_k, teacher_entropy=3.0, student_entropy=3.5,
                          collapse_warnings=["uniform collapse: ..."] if step == 30 else [])
        lines.append(json.dumps(record))
        if with_eval and step % 20 == 0:
            lines.append(json.dumps({"step": step, "epoch": step // 20, "kind": "eval", "knn_top1": 10.0 + step,
                                     "knn_top5": None}))
    (run_dir / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_plot_writes_a_png(tmp_path):
    run = write_log(tmp_path / "run")
    out = plot_run(run)
    assert out == run / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_partial_log_and_custom_out(tmp_path, capsys):
    run = write_log(tmp_path / "run", steps=5, with_eval=False, with_monitor=False)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # killed mid-write
    steps, evals = read_log(run)
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4] and evals == []
    out = tmp_path / "pictures" / "run.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.read_bytes().startswith(PNG_SIGNATURE)


def test_panels_without_data_are_skipped(tmp_path, monkeypatch):
    drawn = []
    import fastdino.eval.plot as plot

    monkeypatch.setattr(plot, "_draw_panel", lambda ax, panel, *rest: drawn.append(panel.title))
    plot_run(write_log(tmp_path / "run", with_eval=False, with_monitor=False))
    skipped = {"output entropy (collapse monitor)", "k-NN accuracy (teacher)"}
    assert drawn == [p.title for p in PANELS if p.title not in skipped]


@pytest.mark.parametrize("setup, message", [
    (lambda run: None, "run folder not found"),
    (lambda run: run.mkdir(), "no log.jsonl in"),
    (lambda run: (run.mkdir(), (run / "log.jsonl").write_text("")), "holds no records yet"),
])
def test_clear_errors(tmp_path, capsys, setup, message):
    run = tmp_path / "run"
    setup(run)
    assert main(["plot", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastdino: error: ") and message in err and err.count("\n") == 1


def test_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--help"])
    assert exit_info.value.code == 0
