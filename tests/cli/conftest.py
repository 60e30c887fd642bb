"""A finished tiny classify run, for the commands that read one."""

import pytest

from tests.helpers import TINY, run_cli


@pytest.fixture
def trained(classifier_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--model", classifier_dir, "--data", reviews_csv, "--output", out, *TINY,
                     "--targets", "all-linear")
    assert code == 0
    return out
