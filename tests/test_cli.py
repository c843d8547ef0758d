"""The command's wiring: every routed command answers --help under its own name, OpenMP's
wait policy is chosen per command before torch loads, and an interruption or a failure is one line
of its own, from the first import on."""
import os
import signal
import subprocess
import sys
import time

import pytest

from fastdino import cli


@pytest.mark.parametrize("group, commands", [("eval", cli.EVAL_COMMANDS), ("data", cli.DATA_COMMANDS)])
def test_module_commands_answer_help_under_their_name(group, commands, capsys):
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            cli.main([group, name, "--help"])
        assert exit_.value.code == 0
        assert f"usage: fastdino {group} {name}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, policy", [
    (["train", "--config", "demo"], "PASSIVE"),
    (["demo"], "PASSIVE"),
    (["data", "convert", "a", "b.beton"], "PASSIVE"),
    (["bench", "loader"], "PASSIVE"),
    (["bench", "train", "--preset", "tiny"], None),
    (["eval", "knn", "x"], None),
    (["export", "x"], None),
])
def test_wait_policy_per_command(argv, policy, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cli.choose_omp_wait_policy(argv)
    assert os.environ.get("OMP_WAIT_POLICY") == policy
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice always wins
    cli.choose_omp_wait_policy(argv)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_policy_is_set_before_torch_loads():
    """`python -m fastdino` imports nothing heavy before main() chooses: torch is not loaded yet."""
    code = "import sys, fastdino.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# Loaded by every interpreter started with its folder on PYTHONPATH: the first import of BLOCK_IMPORT
# says so through a file and waits, so that the test's SIGINT lands in the middle of the imports.
BLOCK_IMPORT = """
import os, signal, sys, time

# As in a terminal: a job started in the background of a non-interactive shell ignores SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)


class Block:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["BLOCK_IMPORT"]:
            sys.meta_path.remove(self)
            open(os.environ["IMPORT_STARTED"], "w").close()
            time.sleep(30)
        return None


sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("argv, module", [
    (["export", "run", "--format", "official", "--out", "x"], "torch"),  # the parser's imports (fastdino.eval)
    (["eval", "knn", "run", "--train", "a.beton", "--val", "b.beton"], "torch"),  # the command module's
    (["export", "run", "--format", "official", "--out", "x"], "fastdino.cli"),  # before main() runs
])
def test_ctrl_c_during_the_startup_imports_is_one_line_and_130(tmp_path, argv, module):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(BLOCK_IMPORT)
    started = tmp_path / "import-started"
    env = {**os.environ, "BLOCK_IMPORT": module, "IMPORT_STARTED": str(started),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "hook"), os.environ.get("PYTHONPATH")]))}
    env.pop("FASTDINO_DEBUG", None)
    job = subprocess.Popen([sys.executable, "-m", "fastdino", *argv], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not started.exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=60)
    assert (job.returncode, out, err) == (130, "", "fastdino: stopped: interrupted\n")


@pytest.mark.parametrize("raised, line", [(RuntimeError("disk full\nmore"), "fastdino: error: disk full"),
                                          (KeyboardInterrupt(), "fastdino: stopped: interrupted")])
def test_the_message_starts_a_line_of_its_own_below_progress_bars(raised, line, monkeypatch, capsys):
    """Bars a failed command leaves open are closed first, the inner one (cleared) before the outer one
    (kept), so that the cursor ends at the start of a fresh line below them."""
    from tqdm import tqdm

    def fail(args):
        # Locals, as a command's own bars: the traceback keeps them alive (and open) up to main().
        bars = [tqdm(total=2, desc="epochs", leave=True),  # kept even below a bar another test left open
                tqdm(total=4, desc="batches", leave=False)]
        bars[1].update(1)
        raise raised

    monkeypatch.setattr(cli, "_plot", fail)
    assert cli.main(["plot", "run"]) == (1 if isinstance(raised, RuntimeError) else 130)
    err = capsys.readouterr().err
    assert "epochs:" in err and "batches:" in err  # the bars were drawn on this stream
    assert err.endswith(f"epochs:   0%|          | 0/2 [00:00<?, ?it/s]\n{line}\n"), repr(err[-300:])
