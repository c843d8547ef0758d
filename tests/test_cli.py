"""The command's wiring: every routed command answers --help under its own name, and OpenMP's
wait policy is chosen per command before torch loads."""
import os
import subprocess
import sys

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
