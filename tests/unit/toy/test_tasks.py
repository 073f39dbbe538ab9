from pathlib import Path

import pytest

from hero_ml.toy.task import TaskError, load_task, task_names


def test_every_shipped_task_validates_and_the_five_kinds_are_there() -> None:
    tasks = [load_task(name) for name in task_names()]
    assert {t.category for t in tasks} == {
        "counting",
        "attribute-binding",
        "anomaly-correction",
        "personalization",
        "content-safety",
    }
    safety = load_task("safety")
    assert safety.eval_prompts and safety.eval_target is not None


def test_a_task_file_from_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: four-squares\ncategory: counting\ndescription: four purple squares\n"
        "prompts: [four purple squares]\ntarget: {require: [{count: 4, color: purple, kind: square}]}\n"
    )
    assert load_task(path).target.require[0].count == 4


def test_bad_task_files_say_which_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ncategory: counting\ndescription: x\nprompts: [a purple dog]\n"
        "target: {require: [{count: 9, color: pink, kind: square}]}\n"
    )
    with pytest.raises(TaskError) as caught:
        load_task(path)
    message = str(caught.value)
    assert "prompts: no '<count> [colour] <shape>' phrase" in message
    assert "target.require.0.count: Input should be less than or equal to 4" in message
    assert "target.require.0.color: Input should be" in message


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    # plain YAML keeps the second `target:` and drops the first unseen
    path = tmp_path / "twice.yaml"
    path.write_text(
        "name: twice\ncategory: counting\ndescription: x\nprompts: [four purple squares]\n"
        "target: {require: [{count: 4, color: purple, kind: square}]}\n"
        "target: {require: [{count: 1, color: purple, kind: square}]}\n"
    )
    with pytest.raises(TaskError, match=r"'target' is given twice \(first on line 5\)"):
        load_task(path)


def test_an_unknown_task_lists_the_shipped_ones() -> None:
    with pytest.raises(TaskError, match="shipped tasks: anomaly, binding, counting, personal, safety"):
        load_task("nope")
