"""`builder check` on a good repository and on deliberately broken copies."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from builder.repository import configs
from builder.repository.check import check_repository


@pytest.fixture
def repo_copy(local_repo, tmp_path):
    target = tmp_path / "repo"
    shutil.copytree(local_repo, target)
    return target


def edit(repo, model, change):
    path = repo / model / "config.pbtxt"
    config = configs.read(path)
    change(config)
    configs.write(config, repo / model)


def test_built_repository_is_clean(local_repo):
    assert check_repository(local_repo) == []


def test_preferred_batch_above_max(repo_copy, contract):
    edit(repo_copy, contract.classifier, lambda c: c.dynamic_batching.preferred_batch_size.append(64))
    assert any("preferred batch size 64 is above max_batch_size 8" in p for p in check_repository(repo_copy))


def test_ensemble_above_step_max_batch(repo_copy, contract):
    edit(repo_copy, contract.postprocess, lambda c: setattr(c, "max_batch_size", 4))
    assert any("ensemble max_batch_size 8 is above the model's 4" in p for p in check_repository(repo_copy))


def test_ensemble_missing_model_and_tensor(repo_copy, contract):
    def break_steps(c):
        c.ensemble_scheduling.step[0].model_name = "nope"
        c.ensemble_scheduling.step[2].input_map["logitz"] = "logits"
    edit(repo_copy, contract.ensemble, break_steps)
    problems = check_repository(repo_copy)
    assert any("'nope' is not in the repository" in p for p in problems)
    assert any("'logitz' is not an input of the model" in p for p in problems)
    assert any("value 'input' is neither an ensemble input" in p for p in problems)


def test_dtype_and_shape_mismatch(repo_copy, contract):
    def fp16(c):
        c.input[0].data_type = configs.mc.DataType.Value("TYPE_FP16")
        c.output[0].dims[0] = 10
    edit(repo_copy, contract.postprocess, fp16)
    problems = check_repository(repo_copy)
    assert any("'classifier_logits' is TYPE_FP32 but TYPE_FP16 is expected" in p for p in problems)
    assert any("'probabilities' has dims [10] but [1000] are expected" in p for p in problems)


def test_missing_files(repo_copy, contract):
    (repo_copy / contract.preprocess / "1" / "model.py").unlink()
    shutil.rmtree(repo_copy / contract.ensemble / "1")
    (repo_copy / contract.postprocess / "config.pbtxt").unlink()
    problems = check_repository(repo_copy)
    assert any(f"{contract.preprocess}: version 1 lacks model.py" in p for p in problems)
    assert any("an ensemble needs an empty one" in p for p in problems)
    assert any(f"{contract.postprocess}: no config.pbtxt" in p for p in problems)


def test_what_a_local_model_loads_but_its_config_does_not_name(repo_copy, contract):
    """The local classifier's model.onnx (loaded by its model.py) and Python that does not compile: the server
    would not start, so `builder check` exits 1 naming each."""
    (repo_copy / contract.classifier / "1" / "model.onnx").unlink()
    (repo_copy / contract.postprocess / "1" / "model.py").write_text("def execute(self, requests)\n    return []\n")
    bad = subprocess.run([sys.executable, "-m", "builder", "check", str(repo_copy)], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"{contract.classifier}: version 1 lacks model.onnx, which the build wrote" in bad.stdout + bad.stderr
    assert (f"{contract.postprocess}: version 1's model.py does not compile (expected ':', line 1)"
            in bad.stdout + bad.stderr)


def test_onnx_against_config(repo_copy, contract):
    def rename(c):
        c.backend = "onnxruntime"
        c.input[0].name = "pixels"
    edit(repo_copy, contract.classifier, rename)
    assert any("config input 'pixels' is not in the ONNX file" in p for p in check_repository(repo_copy))


def test_typo_in_config(repo_copy, contract):
    path = repo_copy / contract.classifier / "config.pbtxt"
    path.write_text(path.read_text().replace("dynamic_batching", "dynamic_batchin"))
    assert any("dynamic_batchin" in p for p in check_repository(repo_copy))


def test_cli_exit_codes(local_repo, repo_copy, contract):
    ok = subprocess.run([sys.executable, "-m", "builder", "check", str(local_repo)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    shutil.rmtree(repo_copy / contract.classifier / "1")
    bad = subprocess.run([sys.executable, "-m", "builder", "check", str(repo_copy)], capture_output=True, text=True)
    assert bad.returncode == 1 and "no version directory" in bad.stdout and "Traceback" not in bad.stderr


def test_ensemble_output_reused_as_step_input(repo_copy, contract):
    def reuse(c):
        c.ensemble_scheduling.step[1].output_map["logits"] = "logits"
        c.ensemble_scheduling.step[2].input_map["logits"] = "logits"
    edit(repo_copy, contract.ensemble, reuse)
    assert any("both an ensemble output and a step input" in p for p in check_repository(repo_copy))


def test_ensemble_with_dynamic_batching_is_reported(repo_copy, contract):
    path = repo_copy / contract.ensemble / "config.pbtxt"
    path.write_text(path.read_text() + "dynamic_batching {\n}\n")
    assert any("another member of oneof" in p for p in check_repository(repo_copy))


def test_negative_instance_count_and_misspelt_backend(repo_copy, contract):
    def negative(config):
        config.instance_group[0].count = -3

    edit(repo_copy, contract.classifier, negative)
    edit(repo_copy, contract.postprocess, lambda config: setattr(config, "backend", "pyhton"))
    problems = check_repository(repo_copy)
    assert any("instance_group count -3 is negative" in p for p in problems), problems
    assert any("backend 'pyhton' is not a Triton backend; did you mean 'python'?" in p for p in problems), problems
    assert not any("mix flavors" in p for p in problems), problems  # a typo, not a mix of flavors
