"""bench/quality.py's bookkeeping: a run of one piece keeps the others' measured figures, entry by entry, with
the settings they were measured with, and the RT headline is the best recipe measured."""

from __future__ import annotations

from bench.quality import carry_over, rt_headline


def _stat(mean):
    return {"mean": mean, "std": 0.004, "n": 3} if mean is not None else {"mean": None, "std": None, "n": 0}


def _results(package, dapt, selfd, runs, settings, **detail):
    return {
        "rt_test_macro_f1": {"package": _stat(package), "dapt": _stat(dapt), "self-distill": _stat(selfd)},
        "rt_self_distill": {"ensemble_seeds": [1, 2, 3], "ensemble_test_macro_f1": None},
        "students": {"1": {"int8_test_f1": 0.834}} if package else {},
        "runs": runs,
        "train_cpu_minutes_detail": {
            "rt_finetune_per_run": {"package": detail.get("package_cpu"), "dapt": detail.get("dapt_cpu")},
            "pretrain": {"rt": detail.get("pretrain")},
            "rt_teacher_per_run": detail.get("teacher"),
            "rt_self_distill_per_run": detail.get("student_cpu"),
        },
        "settings": settings,
        "seeds": [1, 2, 3],
    }


def test_one_piece_keeps_the_others_figures_and_their_settings():
    old_row = {"task": "rt", "source": "package", "seed": 1, "test_f1": 0.839}
    new_row = {"task": "rt", "source": "self-distill", "seed": 1, "test_f1": 0.844}
    before = _results(0.836, 0.837, None, [old_row], {"run": "A"}, package_cpu=21.2, dapt_cpu=21.3, pretrain=19.3)
    before.update(rt_headline(before))
    assert before["rt_test_macro_f1_source"] == "dapt" and before["train_cpu_minutes"] == 40.6

    now = carry_over(_results(None, None, 0.841, [new_row], {"run": "B"}, teacher=16.2, student_cpu=35.0), before)
    now.update(rt_headline(now))
    rt = now["rt_test_macro_f1"]
    assert rt["package"]["mean"] == 0.836 and rt["dapt"]["mean"] == 0.837 and rt["self-distill"]["mean"] == 0.841
    assert now["rt_test_macro_f1_source"] == "self-distill" and now["rt_test_macro_f1_mean"] == 0.841
    assert now["train_cpu_minutes"] == round(3 * 16.2 + 35.0, 1)  # three teachers, then the student
    assert now["runs"] == [new_row, old_row] and now["students"] == before["students"]
    assert now["train_cpu_minutes_detail"]["rt_finetune_per_run"] == {"package": 21.2, "dapt": 21.3}
    assert now["settings"] == {"run": "B"}
    groups = now["carried_over_settings"]
    assert len(groups) == 1 and groups[0]["settings"] == {"run": "A"}
    assert {"rt_test_macro_f1.package", "students", "runs (earlier rows)"} <= set(groups[0]["keys"])

    # Rewriting again with nothing new keeps every figure, and each with the settings it was measured with.
    again = carry_over(_results(None, None, 0.841, [new_row], {"run": "C"}, teacher=16.2, student_cpu=35.0), now)
    assert again["carried_over_settings"] == groups and again["rt_test_macro_f1"] == rt
