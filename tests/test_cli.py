"""The spice-fast command line: argument errors are one clear line, never a traceback."""

import pytest

from spice_fast import cli


def test_bad_model_is_one_line(capsys, tmp_path):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "spice-fast: error:" in err and "not found" in err and "Traceback" not in err


def test_bad_sampling_value_is_one_line(capsys):
    assert cli.main(["generate", "--top-p", "0", "hi"]) == 2
    assert "top_p must be in (0, 1], got 0.0" in capsys.readouterr().err


def test_non_positive_counts_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "-n", "0", "hi"])
    assert "must be a positive integer" in capsys.readouterr().err
