"""Job files: the examples validate; every kind of mistake is reported at its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.api.modelfleet.jobs.v1 import jobs_pb2
from common.api.modelfleet.training.v1 import training_pb2
from services.cli import jobfile
from services.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TRAINING = """\
kind: training
dataset_name: digits
model_name: digits-mlp
"""


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_validate(name: str) -> None:
    jobs = jobfile.load(EXAMPLES / name)
    assert jobs and all(job.kind in jobfile.KINDS for job in jobs)


def test_fields_reach_the_request_in_either_spelling() -> None:
    text = TRAINING + (
        "learningRate: 0.01\n"
        "architecture: {mlp: {hiddenSizes: [8, 4]}}\n"
        "priority: HIGH\n"
        "max_attempts: 2\n"
        "request_id: r1\n"
    )
    (job,) = jobfile.parse(text, "job.yaml")
    assert isinstance(job.request, training_pb2.SubmitTrainingJobRequest)
    assert job.request.spec.learning_rate == 0.01
    assert list(job.request.spec.architecture.mlp.hidden_sizes) == [8, 4]
    assert job.request.priority == jobs_pb2.PRIORITY_HIGH
    assert (job.request.max_attempts, job.request.request_id) == (2, "r1")


def test_a_list_and_several_documents() -> None:
    text = """\
- kind: training
  dataset_name: digits
  model_name: digits-mlp
- kind: compression
  source_model: m
  steps: [{quantization: {method: QUANTIZATION_METHOD_FP16}}]
"""
    assert [(j.kind, j.line) for j in jobfile.parse(text, "list.yaml")] == [
        ("training", 1),
        ("compression", 4),
    ]
    documents = jobfile.parse(TRAINING + "---\n" + TRAINING, "docs.yaml")
    assert [j.line for j in documents] == [1, 5]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        # YAML syntax
        ("kind: training\n  epochs: [1\n", 2, "invalid YAML"),
        # a key given twice
        (TRAINING + "epochs: 1\nepochs: 2\n", 5, "'epochs' repeats"),
        # not a spec field, with the known ones listed
        (TRAINING + "epoch: 3\n", 4, "epoch: unknown field (known: dataset_name"),
        # unknown field inside a nested message
        (TRAINING + "architecture:\n  mlp:\n    hidden: [1]\n", 6, "architecture.mlp.hidden: unknown field"),
        # a bad element of a repeated field (json_format names the field, not the element)
        (
            TRAINING + "architecture:\n  mlp:\n    hidden_sizes:\n      - 3\n      - x\n",
            6,
            "architecture.mlp.hidden_sizes",
        ),
        # a wrong type
        (TRAINING + "epochs: three\n", 4, "epochs: invalid literal"),
        # an unknown enum value
        (TRAINING + "task: TASK_NOPE\n", 4, "task: Invalid enum value TASK_NOPE"),
        # the training service's own static check
        (TRAINING + "epochs: -1\n", 4, "epochs must be >= 1"),
        (TRAINING.replace("digits-mlp", "'bad name'"), 3, "model_name 'bad name' is invalid"),
        # job keys
        ("dataset_name: digits\n", 1, "kind is required"),
        (TRAINING.replace("training", "train"), 1, "kind must be training or compression"),
        (TRAINING + "priority: urgent\n", 4, "priority must be low, normal or high"),
        (TRAINING + "max_attempts: -1\n", 4, "max_attempts must be an integer >= 0"),
        ("", 1, "holds no job"),
    ],
)
def test_errors_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(jobfile.JobFileInvalid) as err:
        jobfile.parse(text, "job.yaml")
    (error,) = err.value.errors
    assert error.startswith(f"job.yaml:{line}: "), error
    assert words in error


def test_compression_errors_and_all_problems_of_a_list() -> None:
    text = """\
- kind: compression
  source_model: m
  steps:
    - quantization: {method: QUANTIZATION_METHOD_INT8_DYNAMIC}
    - finetune: {epochs: 1}
- kind: compression
  source_model: m
  steps:
    - finetune: {epochs: 1}
      quantization: {}
- kind: compression
  source_model: m
  steps:
    - quantization: {method: BOGUS}
- 3
"""
    with pytest.raises(jobfile.JobFileInvalid) as err:
        jobfile.parse(text, "list.yaml")
    assert err.value.errors == [
        "list.yaml:4: steps[0].quantization must be the last step (nothing can train quantized weights)",
        'list.yaml:9: steps[0]: Message type "modelfleet.compression.v1.CompressionStep" should not have '
        'multiple "step" oneof fields',
        "list.yaml:14: steps[0].quantization.method: Invalid enum value BOGUS for enum type "
        "modelfleet.compression.v1.QuantizationMethod",
        "list.yaml:15: a job must be a mapping of fields, not int",
    ]


def test_submit_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--check", str(EXAMPLES / "sweep-digits.yaml"), "-o", "json"]) == 0
    assert '"jobs": 3' in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(TRAINING + "epochs: 0.5\n")
    assert main(["submit", "--check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modelfleet: {bad}:4: epochs") and err.count("\n") == 1
    assert main(["submit", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read job file" in capsys.readouterr().err
