"""Triton's classification extension on every served output: no request stops the server, and NVIDIA's own
example client classifies a folder of photos through the ensemble unchanged."""

from __future__ import annotations

import shutil

import pytest

from conftest import class_count_on_every_output, needs_nvidia_examples, nvidia_ensemble_image_client


@pytest.mark.server
def test_class_count_on_every_output_of_every_model_answers(server, contract, photos, timm_reference, tiny_model):
    answers = class_count_on_every_output(server, photos)
    assert {model for _, model, _ in answers} == set(contract.model_names)
    failed = {key: answer for key, answer in answers.items() if not isinstance(answer, list)}
    assert not failed, failed
    best = timm_reference(photos[:1]).argmax(1)[0]
    labelled = (contract.probabilities.name, contract.logits.name)
    for (protocol, model, output), row in answers.items():
        assert len(row) == 3, (protocol, model, output, row)
        if output in labelled:  # indexed by class: score, index and the class's name
            for entry in row:
                score, index, label = entry.split(":", 2)
                assert label == tiny_model.class_names[int(index)], (protocol, model, output, row)
            if model == contract.ensemble:  # the one model here that took the photo itself
                assert int(row[0].split(":")[1]) == best


@pytest.mark.server
@needs_nvidia_examples
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_nvidia_ensemble_image_client_classifies_a_folder(server, contract, photo_paths, timm_reference, tiny_model,
                                                          tmp_path, protocol):
    folder = tmp_path / "jpegs"
    folder.mkdir()
    jpegs = sorted(p for p in photo_paths if p.suffix == ".jpg")[:4]
    for path in jpegs:
        shutil.copy2(path, folder / path.name)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    printed = nvidia_ensemble_image_client(url, protocol, contract.ensemble, folder)
    assert sorted(printed) == sorted(p.name for p in jpegs)
    reference = timm_reference([p.read_bytes() for p in jpegs]).argmax(1)
    for path, best in zip(jpegs, reference):
        for output in (contract.probabilities.name, contract.logits.name):
            score, index, label = printed[path.name][output][0]
            assert index == best and label == tiny_model.class_names[best], (path.name, output)
