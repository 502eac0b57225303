"""opd_jax.study.workdir.prepare_out_dir: a study's directory is bound to the config that first
ran there; --fresh empties it; nothing else is touched."""

import json

import pytest

from opd_jax.study.workdir import prepare_out_dir


def test_out_dir_is_bound_to_its_config_and_fresh_empties_it(tmp_path):
    out = tmp_path / "study"
    prepare_out_dir(out, {"seeds": (0, 1)}, fresh=False)
    assert json.loads((out / "study_config.json").read_text()) == {"seeds": [0, 1]}
    (out / "result.json").write_text("{}")
    prepare_out_dir(out, {"seeds": [0, 1]}, fresh=False)          # same config: resumes
    assert (out / "result.json").exists()
    with pytest.raises(ValueError, match="different config.*--fresh"):
        prepare_out_dir(out, {"seeds": [0]}, fresh=False)
    assert json.loads((out / "study_config.json").read_text()) == {"seeds": [0, 1]}
    prepare_out_dir(out, {"seeds": [0]}, fresh=True)
    assert not (out / "result.json").exists()
    assert json.loads((out / "study_config.json").read_text()) == {"seeds": [0]}
