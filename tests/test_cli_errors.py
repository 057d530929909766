"""`clipmoe` (clipmoe_cli.main): a bad input is one ``error:`` line on stderr and exit status 2; ``--traceback`` /
``CLIPMOE_TRACEBACK=1`` add the traceback; bugs keep their traceback. The LLaVA and routing commands' own bad
inputs are tested in tests/test_llava_pipeline.py and tests/test_routing.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipmoe_cli import main as cli
from clipmoe_vlm.run_config import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_sys_argv(monkeypatch):
    """The dispatcher sets sys.argv (argparse's usage line names the command); put it back after each test."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))


@pytest.fixture
def fake(monkeypatch):
    """``clipmoe fake ARGS``: raises what the test puts in ``raised``; records the arguments it got."""
    calls: list[list[str]] = []
    raised: list[BaseException] = []

    def command(argv):
        calls.append(list(argv))
        if raised:
            raise raised[0]
        return 0

    monkeypatch.setitem(cli.COMMANDS, "fake", ("unused:unused", "a test command"))
    monkeypatch.setattr(cli, "resolve", lambda name: command)
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    return calls, raised


@pytest.mark.parametrize("error, line", [
    (ValueError("--batch-size must be > 0, got -1"), "error: --batch-size must be > 0, got -1"),
    (ConfigError("run.yaml: unknown key 'lr'"), "error: run.yaml: unknown key 'lr'"),
    (FileNotFoundError("questions.jsonl does not exist"), "error: questions.jsonl does not exist"),
    (FileNotFoundError(2, "No such file or directory", "x.json"),
     "error: [Errno 2] No such file or directory: 'x.json'"),
    (NotADirectoryError("images is not a directory"), "error: images is not a directory"),
    (PermissionError("runs/out: permission denied"), "error: runs/out: permission denied"),
    # a command's own SystemExit("...") gets the prefix once, with or without its own "error: "
    (SystemExit("error: config: top_k (5) must be between 1 and num_experts (4)"),
     "error: config: top_k (5) must be between 1 and num_experts (4)"),
    (SystemExit("--images x.jsonl: the file has no lines"), "error: --images x.jsonl: the file has no lines"),
])
def test_user_errors_are_one_line_and_status_2(fake, capsys, error, line):
    _, raised = fake
    raised.append(error)
    assert cli.main(["fake", "--flag"]) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n"
    assert captured.out == ""


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), AssertionError("shapes differ"),
                                   TypeError("unsupported operand"), KeyError("layer.0.weight"),
                                   OSError("disk failure")])
def test_internal_errors_keep_their_traceback(fake, capsys, error):
    _, raised = fake
    raised.append(error)
    with pytest.raises(type(error)):
        cli.main(["fake"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("code", [0, 1, 3, None])
def test_integer_exits_pass_through(fake, capsys, code):
    _, raised = fake
    raised.append(SystemExit(code))
    with pytest.raises(SystemExit) as info:
        cli.main(["fake"])
    assert info.value.code == code
    assert capsys.readouterr().err == ""


def test_traceback_flag_anywhere_before_double_dash(fake, capsys):
    calls, raised = fake
    raised.append(ValueError("bad value"))
    for argv in (["--traceback", "fake", "a"], ["fake", "a", "--traceback"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):")
        assert "ValueError: bad value" in err
        assert err.splitlines()[-1] == "error: bad value"
    assert calls == [["a"], ["a"]]  # the command never sees the flag
    raised.clear()
    assert cli.main(["fake", "--", "--traceback"]) == 0  # after --: another program's argument
    assert calls[-1] == ["--", "--traceback"]


@pytest.mark.parametrize("value, shown", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_traceback_environment_variable(fake, capsys, monkeypatch, value, shown):
    _, raised = fake
    raised.append(FileNotFoundError("missing.yaml"))
    monkeypatch.setenv(cli.TRACEBACK_ENV, value)
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert ("Traceback (most recent call last):" in err) is shown
    assert err.splitlines()[-1] == "error: missing.yaml"


def test_help_names_the_traceback_flag(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--traceback" in out and "CLIPMOE_TRACEBACK=1" in out


# ---------------------------------------------------------------------------------------------------- real commands
def test_train_llava_bad_config_key_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("stage: pretrain\nlearning_rat: 0.1\n")
    assert cli.main(["train-llava", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: {config}: unknown key 'learning_rat'")
    assert not (tmp_path / "runs").exists()


def test_upcycle_error_is_not_doubled(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["upcycle", "--top-k", "5"]) == 2
    assert capsys.readouterr().err == "error: config: top_k (5) must be between 1 and num_experts (4)\n"


def test_argparse_usage_errors_still_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["merge-lora"])  # the two positional folders are missing
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: clipmoe merge-lora") and "error: the following arguments are required" in err


def test_a_script_prints_one_line_and_exits_2(tmp_path):
    """Through scripts/*.py, in a real process: the error line is all of stderr (no traceback)."""
    env = {key: value for key, value in os.environ.items() if key != cli.TRACEBACK_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    command = [sys.executable, str(REPO / "scripts" / "analyze_routing.py"), "--model", str(tmp_path), "--images",
               str(empty), "--output", str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stderr == (f"error: --images {empty}: the file has no lines (expected JSONL with an \"image\" per "
                          "line)\n")
    assert run.stdout == ""
    assert not (tmp_path / "out").exists()
