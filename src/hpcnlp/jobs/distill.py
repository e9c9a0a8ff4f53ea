"""`hpcnlp distill`: a fine-tuned teacher teaches a smaller student (sequence or token classification).

Student: the teacher with n of its L encoder layers kept, every k-th (k = L/n, the top layer kept;
DistilBERT-style: same embeddings, same head), or a smaller local model with the same tokenizer.
Loss: alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy on the gold labels,
both over labelled positions only (token labels of -100 are masked out).
Report: teacher vs student metric (retention %), parameters, and latency on the same inputs.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field

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
    teacher: str  # a fine-tuned model dir (hpcnlp finetune output_dir)
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

    def problems(self) -> list[Problem]:
        out = self.training.problems()
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
    return checks.model_config(cfg.student_model_name_or_path or cfg.teacher)


def check(cfg: DistillConfig, pending: Iterable[str] = ()) -> list[Problem]:
    out = checks.training(cfg.training, cfg.output_dir) + checks.resume(cfg)
    out += checks.model("teacher", cfg.teacher, pending)
    out += checks.model("student_model_name_or_path", cfg.student_model_name_or_path, pending)
    task = model_task(cfg.teacher)
    teacher_ready = not is_inside(cfg.teacher, pending) and not any(p.key == "teacher" for p in out)
    if teacher_ready and not tasks.labelled(task):
        out.append(
            Problem(
                key="teacher",
                message=f"'{cfg.teacher}' is not a sequence or token classifier",
                fix="point it at a `hpcnlp finetune` output_dir",
            )
        )
    if tasks.labelled(task):
        out += tasks.data_problems(task, cfg.data, pending)
        out += checks.max_seq_length(cfg.data.max_seq_length, "teacher", cfg.teacher, pending)
        out += checks.max_seq_length(
            cfg.data.max_seq_length, "student_model_name_or_path", cfg.student_model_name_or_path, pending
        )
    if tasks.labelled(task) and cfg.student_num_layers:
        n = (checks.model_config(cfg.teacher) or {}).get("num_hidden_layers")
        if n is None or n % cfg.student_num_layers or cfg.student_num_layers >= n:
            out.append(
                Problem(
                    key="student_num_layers",
                    message=f"cannot keep {cfg.student_num_layers} of the teacher's {n} layers evenly",
                    fix="use a divisor of the layer count smaller than it (e.g. 6 -> 3 or 2)",
                )
            )
    out += checks.overlaps(
        cfg.output_dir,
        {"teacher": cfg.teacher, "student_model_name_or_path": cfg.student_model_name_or_path, **cfg.data.files()},
    )
    return out + checks.output_dir(cfg, cfg.resume)


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


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE, over positions whose label is not -100."""
    import torch.nn.functional as F

    n = student_logits.size(-1)
    s, t, y = student_logits.reshape(-1, n), teacher_logits.reshape(-1, n), labels.reshape(-1)
    keep = y != IGNORE
    s, t, y = s[keep], t[keep], y[keep]
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean"
    )
    return alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s, y)


def trainer_class():
    import torch

    from hpcnlp.train.harness import ResumableTrainer

    class DistillTrainer(ResumableTrainer):
        """A Trainer whose loss also listens to a frozen teacher."""

        def __init__(self, *args, teacher, temperature: float, alpha: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.temperature, self.alpha = temperature, alpha

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs).logits
            loss = distillation_loss(outputs.logits, teacher_logits, labels, self.temperature, self.alpha)
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(cfg: DistillConfig) -> int:
    import torch

    from hpcnlp.train.harness import TrainingRun

    teacher_dir = resolve_model_path(cfg.teacher)
    task = task_of(teacher_dir)
    names = label_names(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir, cfg.trust_remote_code)
    data = load_data(task, cfg.data, tokenizer, teacher_dir)  # every row checked before anything is written

    run = TrainingRun(cfg, model_config(cfg))
    teacher = auto_model_class(task).from_pretrained(teacher_dir, trust_remote_code=cfg.trust_remote_code)
    student = build_student(cfg, teacher, task, names, tokenizer)
    collator = tasks.get(task).collator(tokenizer)
    trainer = run.trainer(
        trainer_class(),
        model=student,
        train_dataset=data.splits["train"],
        eval_dataset=data.splits["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        teacher=teacher,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
    )
    code = run.train()
    if code is not None:
        return code
    run.save()  # student weights, config.json (n layers, id2label), tokenizer
    if not run.is_main:
        return 0

    # Teacher and student on the same eval set and the same padded inputs, on this process's CPU/GPU.
    student, teacher = trainer.model.eval(), teacher.to(trainer.model.device).eval()
    eval_ds, pad = data.splits["validation"], tokenizer.pad_token_id
    compare = {}
    for who, model in (("teacher", teacher), ("student", student)):
        runner = torch_runner(model)
        compare[who] = {
            "metrics": evaluate(runner, eval_ds, task, names, pad),
            "parameters": num_parameters(model),
            "layers": model.config.num_hidden_layers,
            "latency": {str(b): latency(runner, eval_ds, b, cfg.latency, pad) for b in cfg.latency.batch_sizes},
        }
    primary = tasks.get(task).primary_metric
    t_score, s_score = compare["teacher"]["metrics"][primary], compare["student"]["metrics"][primary]
    metrics = {
        "job": "distill",
        "task": task,
        "teacher": teacher_dir,
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
            "model": who,
            primary: c["metrics"][primary],
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
        plot_title=f"distillation: {Path(teacher_dir).name}",
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
