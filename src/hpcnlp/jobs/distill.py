"""`hpcnlp distill`: a fine-tuned teacher teaches a smaller student (sequence or token classification).

Student: the teacher with n of its L encoder layers kept, every k-th (k = L/n, the top layer kept;
DistilBERT-style: same embeddings, same head), or a local model with the same tokenizer (a smaller one,
or the teacher's own base: self-distillation).
Loss: alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy on the gold labels,
both over labelled positions only (token labels of -100 are masked out). Several teachers (an ensemble,
e.g. fine-tunes of one recipe with other seeds) teach through their averaged probabilities at T.
Report: teacher vs student metric (retention %), parameters, and latency on the same inputs.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from hpcnlp import checks, tasks
from hpcnlp.config import ConfigError, FinetuneDataConfig, LatencyConfig, Problem, TrainingConfig, TrainingJobConfig
from hpcnlp.data.labels import IGNORE
from hpcnlp.models import encoder_layers, load_tokenizer, resolve_model_path
from hpcnlp.report import markdown_table, mb
from hpcnlp.runtime.io import is_inside
from hpcnlp.spec import JobSpec
from hpcnlp.tasks import auto_model_class, evaluate, label_names, latency, load_data, model_task, task_of, torch_runner

log = logging.getLogger(__name__)


# --- config: the job's YAML schema (shared sections in hpcnlp.config) ---------------------------
class DistillConfig(TrainingJobConfig):
    """A smaller student learns from a fine-tuned teacher: alpha*T^2*KL(student/T || teacher/T) + (1-alpha)*CE."""

    job: Literal["distill"] = "distill"
    # A fine-tuned model dir (hpcnlp finetune output_dir), or a list of them: an ensemble whose averaged
    # probabilities the student learns (the first one's layers seed a student_num_layers student).
    teacher: str | list[str]
    # Student: the teacher with `student_num_layers` of its layers kept evenly (every k-th, k = L / n,
    # DistilBERT-style), or a smaller local model with the same tokenizer.
    student_num_layers: int | None = Field(None, ge=1)
    student_model_name_or_path: str | None = None
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft (teacher) loss
    trust_remote_code: bool = False
    data: FinetuneDataConfig
    latency: LatencyConfig = Field(default_factory=LatencyConfig)  # teacher vs student, same inputs
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @field_validator("teacher", mode="before")
    @classmethod
    def _one_or_a_list(cls, value):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ValueError("give a fine-tuned model dir, or a list of them")  # one line, not one per union member

    @property
    def teachers(self) -> list[str]:
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def problems(self) -> list[Problem]:
        out = self.training.problems()
        if not self.teachers:
            out.append(Problem(key="teacher", message="the list of teachers is empty", fix="name at least one"))
        if (self.student_num_layers is None) == (self.student_model_name_or_path is None):
            out.append(
                Problem(
                    key="student_num_layers",
                    message="give exactly one of student_num_layers and student_model_name_or_path",
                    fix="set the other to null",
                )
            )
        return out


def model_config(cfg: DistillConfig) -> dict | None:
    """The sizes of the student trained (training.bf16: auto's probe): the teacher's, or its own model's."""
    return checks.model_config(cfg.student_model_name_or_path or cfg.teachers[0])


def check(cfg: DistillConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.training(cfg.training, cfg.output_dir) + checks.resume(cfg)
    for t in cfg.teachers:
        out += checks.model("teacher", t, pending)
    out += checks.model("student_model_name_or_path", cfg.student_model_name_or_path, pending)
    ready = [t for t in cfg.teachers if not is_inside(t, pending)]  # a pipeline's earlier stages write the rest
    if not any(p.key == "teacher" for p in out):
        out += [
            Problem(
                key="teacher",
                message=f"'{t}' is not a sequence or token classifier",
                fix="point it at a `hpcnlp finetune` output_dir",
            )
            for t in ready
            if not tasks.labelled(model_task(t))
        ]
    if not any(p.key == "teacher" for p in out):
        out += ensemble_problems(ready)
    student = cfg.student_model_name_or_path
    if (
        ready
        and student
        and not is_inside(student, pending)
        and not any(p.key == "student_model_name_or_path" for p in out)
    ):
        out += student_vocabulary_problems(ready[0], student, cfg.trust_remote_code)
    task = next((model_task(t) for t in cfg.teachers if tasks.labelled(model_task(t))), None)
    if tasks.labelled(task):
        out += tasks.data_problems(task, cfg.data, pending)
        for t in cfg.teachers:
            out += checks.max_seq_length(cfg.data.max_seq_length, "teacher", t, pending)
        out += checks.max_seq_length(
            cfg.data.max_seq_length, "student_model_name_or_path", cfg.student_model_name_or_path, pending
        )
    if tasks.labelled(task) and cfg.student_num_layers:
        n = (checks.model_config(cfg.teachers[0]) or {}).get("num_hidden_layers")
        if n is None or n % cfg.student_num_layers or cfg.student_num_layers >= n:
            out.append(
                Problem(
                    key="student_num_layers",
                    message=f"cannot keep {cfg.student_num_layers} of the teacher's {n} layers evenly",
                    fix="use a divisor of the layer count smaller than it (e.g. 6 -> 3 or 2)",
                )
            )
    teachers = {"teacher" if i == 0 else f"teacher[{i}]": t for i, t in enumerate(cfg.teachers)}
    out += checks.overlaps(
        cfg.output_dir, {**teachers, "student_model_name_or_path": cfg.student_model_name_or_path, **cfg.data.files()}
    )
    return out + checks.output_dir(cfg, cfg.resume)


def ensemble_problems(teachers: list[str]) -> list[Problem]:
    """Teachers of one student must answer the same question: one task, the same labels in the same order, one
    vocabulary (they all read the student's input ids)."""
    if len(teachers) < 2:
        return []

    def identity(name: str):
        path = resolve_model_path(name)
        try:
            vocab = load_tokenizer(path).get_vocab()
        except (OSError, ValueError):
            return Problem(key="teacher", message=f"no tokenizer loads from '{name}'", fix="save one with the model")
        return task_of(path), label_names(path), vocab

    want = identity(teachers[0])
    for t in teachers[1:]:
        got = identity(t)
        for bad in (want, got):
            if isinstance(bad, Problem):
                return [bad]
        for what, a, b in zip(("task", "labels", "vocabulary"), want, got):
            if a != b:
                return [
                    Problem(
                        key="teacher",
                        message=f"'{t}' has another {what} than '{teachers[0]}'",
                        fix="an ensemble's teachers are fine-tunes of one task, labels and tokenizer",
                    )
                ]
    return []


def student_vocabulary_problems(teacher: str, student: str, trust_remote_code: bool) -> list[Problem]:
    """The student reads the teacher's input ids: the same vocabulary (build_student refuses it at run time)."""
    try:
        same = (
            load_tokenizer(resolve_model_path(student), trust_remote_code).get_vocab()
            == load_tokenizer(resolve_model_path(teacher), trust_remote_code).get_vocab()
        )
    except (OSError, ValueError):
        return [
            Problem(key="student_model_name_or_path", message=f"no tokenizer loads from '{student}'", fix="save one")
        ]
    if same:
        return []
    return [
        Problem(
            key="student_model_name_or_path",
            message=f"'{student}' has another vocabulary than the teacher '{teacher}'",
            fix="use a student with the teacher's tokenizer",
        )
    ]


def student_from_teacher(teacher, num_layers: int):
    """A copy of the teacher keeping every k-th layer (k = L / n), ending with the top layer."""
    import torch

    student = copy.deepcopy(teacher)
    parent, name = encoder_layers(student)
    layers = getattr(parent, name)
    k = len(layers) // num_layers
    keep = list(range(k - 1, len(layers), k))
    setattr(parent, name, torch.nn.ModuleList(layers[i] for i in keep))
    student.config.num_hidden_layers = num_layers
    log.info("student: teacher layers %s of %d", keep, len(layers))
    return student


def build_student(cfg: DistillConfig, teacher, task: str, names: list[str], teacher_tokenizer):
    if cfg.student_num_layers:
        return student_from_teacher(teacher, cfg.student_num_layers)
    path = resolve_model_path(cfg.student_model_name_or_path)
    if load_tokenizer(path, cfg.trust_remote_code).get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(
            cfg._source,
            [
                Problem(
                    key="student_model_name_or_path",
                    message=f"'{path}' has another vocabulary than the teacher",
                    fix="use a student with the teacher's tokenizer",
                )
            ],
        )
    return auto_model_class(task).from_pretrained(
        path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
        trust_remote_code=cfg.trust_remote_code,
    )


def soft_targets(teacher_logits, temperature: float):
    """Log of the teachers' mean probabilities at T (one teacher: its log-softmax). Probabilities, not logits,
    are averaged: an ensemble's prediction, whatever scale each teacher's logits have."""
    import math

    import torch

    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = [teacher_logits]
    log_p = torch.stack([torch.log_softmax(t.float() / temperature, -1) for t in teacher_logits])
    return torch.logsumexp(log_p, 0) - math.log(len(teacher_logits))


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE, over positions whose label is not -100.
    teacher_logits: a tensor, or a list of them (an ensemble: KL to their mean probabilities)."""
    import torch.nn.functional as F

    n = student_logits.size(-1)
    s, t, y = (
        student_logits.reshape(-1, n),
        soft_targets(teacher_logits, temperature).reshape(-1, n),
        labels.reshape(-1),
    )
    keep = y != IGNORE
    s, t, y = s[keep], t[keep], y[keep]
    kl = F.kl_div(F.log_softmax(s / temperature, -1), t, log_target=True, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s, y)


def ensemble_runner(models):
    """A runner (hpcnlp.tasks) of the teachers together: log of their mean probabilities (T = 1)."""
    import torch

    runners = [torch_runner(m) for m in models]
    if len(runners) == 1:
        return runners[0]

    def run(inputs):
        logits = [torch.from_numpy(r(inputs)["logits"]) for r in runners]
        return {"logits": soft_targets(logits, 1.0).numpy()}

    return run


def trainer_class():
    import torch

    from hpcnlp.train.harness import ResumableTrainer

    class DistillTrainer(ResumableTrainer):
        """A Trainer whose loss also listens to frozen teachers (one, or an ensemble)."""

        def __init__(self, *args, teachers, temperature: float, alpha: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.teachers = [t.to(self.args.device).eval().requires_grad_(False) for t in teachers]
            self.temperature, self.alpha = temperature, alpha

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = [t(**inputs).logits for t in self.teachers]
            loss = distillation_loss(outputs.logits, teacher_logits, labels, self.temperature, self.alpha)
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(cfg: DistillConfig) -> int:
    import torch

    from hpcnlp.train.harness import TrainingRun

    teacher_dirs = [resolve_model_path(t) for t in cfg.teachers]
    teacher_dir = teacher_dirs[0]
    task = task_of(teacher_dir)
    names = label_names(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir, cfg.trust_remote_code)
    data = load_data(task, cfg.data, tokenizer, teacher_dir)  # every row checked before anything is written

    run = TrainingRun(cfg, model_config(cfg))
    teachers = [
        auto_model_class(task).from_pretrained(d, trust_remote_code=cfg.trust_remote_code) for d in teacher_dirs
    ]
    student = build_student(cfg, teachers[0], task, names, tokenizer)
    collator = tasks.get(task).collator(tokenizer)
    trainer = run.trainer(
        trainer_class(),
        model=student,
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=tasks.get(task).compute_metrics(names, cfg.data),  # eval_strategy, load_best_model_at_end
        teachers=teachers,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
    )
    code = run.train()
    if code is not None:
        return code
    run.save()  # student weights, config.json (n layers, id2label), tokenizer
    if not run.is_main:
        return 0

    # Teacher(s) and student on the same eval sets and the same padded inputs, on this process's CPU/GPU.
    student = trainer.model.eval()
    teachers = [t.to(student.device).eval() for t in teachers]
    eval_ds, pad = data.splits["validation"], tokenizer.pad_token_id
    compare = {}
    for who, models, runner in (
        ("teacher", teachers, ensemble_runner(teachers)),
        ("student", [student], torch_runner(student)),
    ):
        compare[who] = {
            "metrics": evaluate(runner, eval_ds, task, names, pad),
            **({"test_metrics": evaluate(runner, data.splits["test"], task, names, pad)} if cfg.data.test_file else {}),
            "parameters": sum(num_parameters(m) for m in models),
            "layers": models[0].config.num_hidden_layers,
            "latency": {str(b): latency(runner, eval_ds, b, cfg.latency, pad) for b in cfg.latency.batch_sizes},
        }
    primary = tasks.get(task).primary_metric
    t_score, s_score = compare["teacher"]["metrics"][primary], compare["student"]["metrics"][primary]
    metrics = {
        "job": "distill",
        "task": task,
        "teachers": teacher_dirs,
        "metric": primary,
        **compare,
        "retention_pct": round(100 * s_score / t_score, 2) if t_score else None,
        "parameter_ratio": round(compare["student"]["parameters"] / compare["teacher"]["parameters"], 4),
        "speedup": {
            b: round(compare["teacher"]["latency"][b]["p50_ms"] / compare["student"]["latency"][b]["p50_ms"], 2)
            for b in compare["teacher"]["latency"]
        },
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "threads": torch.get_num_threads(),
        **run.metrics(),
    }
    rows = [
        {
            "model": who if who == "student" or len(teachers) == 1 else f"{len(teachers)} teachers (ensemble)",
            primary: c["metrics"][primary],
            **({f"test {primary}": c["test_metrics"][primary]} if "test_metrics" in c else {}),
            "parameters": f"{c['parameters']:,}",
            "layers": c["layers"],
            **{f"p50 ms batch {b}": v["p50_ms"] for b, v in c["latency"].items()},
        }
        for who, c in compare.items()
    ]
    run.write_report(
        f"Distillation ({task})",
        metrics,
        [
            ("Teacher vs student", markdown_table(rows)),
            (
                "Summary",
                f"student keeps {metrics['retention_pct']}% of the teacher's {primary} with "
                f"{metrics['parameter_ratio']:.0%} of its parameters; speed-up (p50) {metrics['speedup']} at "
                f"seq {cfg.latency.seq_length}, {metrics['threads']} thread(s); T={cfg.temperature}, "
                f"alpha={cfg.alpha}",
            ),
        ],
        plot_title=f"distillation: {', '.join(Path(d).name for d in teacher_dirs)}",
    )
    log.info(
        "student %s %.4f vs teacher %.4f (%.1f%%), speed-up %s; model and report in %s",
        primary,
        s_score,
        t_score,
        metrics["retention_pct"] or 0,
        metrics["speedup"],
        cfg.output_dir,
    )
    return 0


def summary_row(cfg: DistillConfig) -> dict:
    out = Path(cfg.output_dir)
    m = json.loads((out / "metrics.json").read_text())
    metric, s, t = m["metric"], m["student"], m["teacher"]
    row = {
        "metric": f"student {metric} {s['metrics'][metric]:.3f} ({m['retention_pct']}% of teacher's "
        f"{t['metrics'][metric]:.3f}), {s['layers']}/{t['layers']} layers",
        "size": mb(out / "model.safetensors"),
    }
    lat = {who: m[who]["latency"].get("1", {}).get("p50_ms") for who in ("teacher", "student")}
    if all(lat.values()):
        row["latency b1 p50"] = f"{lat['student']:.1f} ms (teacher {lat['teacher']:.1f} ms)"
    return row


SPEC = JobSpec(
    name="distill",
    order=40,
    resumable=True,
    help="distill a fine-tuned teacher into a smaller student; retention, speed-up",
    config=DistillConfig,
    check=check,
    run=run,
    summary_row=summary_row,
    model_config=model_config,
)
