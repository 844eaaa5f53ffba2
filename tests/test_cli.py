"""The CLI's answers to a mistyped command line: a clear message and exit status 2, before any service starts."""

import pytest

from engram.coordinator.cli import main


@pytest.mark.parametrize("command", [["bench", "niah"], ["serve"], ["load"], ["demo"]])
def test_a_missing_config_file_is_named_not_a_traceback(tmp_path, capsys, command):
    missing = tmp_path / "nope.toml"
    assert main([*command, "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"the config file {missing} does not exist" in err and "Traceback" not in err
