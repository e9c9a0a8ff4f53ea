"""The Trainer run that pretrain, finetune and distill share; each job adds only its data, model, metrics.

    run = TrainingRun(cfg, remove_unused_columns=False)     # TrainingArguments, seed
    trainer = run.trainer(model=..., train_dataset=..., ...)  # + throughput/ETA log, preemption, resume target
    code = run.train()                                        # None: finished, every rank holds the same weights
    if code is not None: return code                          # 75: checkpointed for requeue; 1: ranks drifted
    run.save()                                                # model (safetensors), tokenizer, config
    if run.is_main: run.write_report(title, {**run.metrics(), ...}, sections)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from hpcnlp.config import JobConfig, TrainingConfig, dump_config
from hpcnlp.report import plot_loss, write_report
from hpcnlp.runtime import env
from hpcnlp.runtime.checkpoints import resume_target
from hpcnlp.runtime.io import atomic_write_text
from hpcnlp.runtime.preempt import PreemptionCallback, requeue_exit
from hpcnlp.train.callbacks import ThroughputCallback, peak_memory_mb
from hpcnlp.train.replicas import replicas_identical

log = logging.getLogger(__name__)


def training_arguments(t: TrainingConfig, output_dir: str, **job_settings) -> TrainingArguments:
    """`training:` as TrainingArguments, with what the job owns filled in."""
    kwargs = {
        # Without use_cpu, accelerate finds no backend on a GPU-less machine: under torchrun every
        # rank then trains alone (no DDP, every rank "rank 0"). use_cpu makes it MULTI_CPU over gloo.
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_pin_memory": torch.cuda.is_available(),
        "disable_tqdm": True,  # ThroughputCallback logs one readable line per logging step instead
        "include_num_input_tokens_seen": "non_padding",
        # Our models use every parameter that trains; DDP's search for unused ones costs a pass per step.
        "ddp_find_unused_parameters": False,
        # One TensorBoard curve across requeues: a fixed log dir and run name (HF's default dir is per start).
        "logging_dir": str(Path(output_dir) / "runs"),
        "run_name": Path(output_dir).name,
        **t.model_dump(),  # hpcnlp's defaults and everything the config sets
        **job_settings,
    }
    if kwargs.get("eval_steps") is None:
        kwargs["eval_steps"] = kwargs.get("save_steps")  # evaluate where checkpoints are saved
    return TrainingArguments(output_dir=output_dir, **kwargs)


class TrainingRun:
    def __init__(self, cfg: JobConfig, **job_settings):
        self.cfg, self.out, self.t_start = cfg, Path(cfg.output_dir), time.perf_counter()
        self.args = training_arguments(cfg.training, cfg.output_dir, **job_settings)
        set_seed(self.args.seed)  # before any head is initialised
        self.checkpoint: str | None = None
        self.result = None
        self.replicas: bool | None = None

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0

    def trainer(self, trainer_class=Trainer, callbacks=(), **kwargs) -> Trainer:
        a = self.args
        self.throughput = ThroughputCallback(a.per_device_train_batch_size * a.gradient_accumulation_steps
                                             * a.world_size)
        self.preemption = PreemptionCallback(self.cfg.output_dir)
        self._trainer = trainer_class(args=a, callbacks=[self.throughput, self.preemption, *callbacks], **kwargs)
        self._trainer.remove_callback(PrinterCallback)  # ThroughputCallback logs instead
        self.checkpoint = resume_target(self.cfg.resume, self.out, restarted=env.slurm_restart_count() > 0)
        return self._trainer

    def train(self) -> int | None:
        """Train (resuming when configured or requeued). None when finished and the ranks agree;
        else the exit code: REQUEUE_EXIT after a preemption checkpoint, 1 when replicas drifted."""
        if self.checkpoint:
            log.info("resuming from %s", self.checkpoint)
        # Installed only now, after data preparation: forked prepare workers never see our handlers.
        self.preemption.install_handlers()
        try:
            self.result = self._trainer.train(resume_from_checkpoint=self.checkpoint)
        finally:
            self.preemption.restore_handlers()
        if self.preemption.requested:
            return requeue_exit(self._trainer.state.global_step)
        self.replicas = replicas_identical(self._trainer.model)  # False: ranks drifted apart (logged)
        return 1 if self.replicas is False else None

    def save(self) -> None:
        """The model (safetensors), its config and tokenizer into output_dir (rank 0 writes)."""
        self._trainer.save_model(self.cfg.output_dir)
        if self.is_main:
            (self.out / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.resolved.yaml says it

    def metrics(self) -> dict:
        """What every training job reports about its run."""
        state, m = self._trainer.state, self.result.metrics
        seconds = m["train_runtime"]
        tokens = state.num_input_tokens_seen - self.throughput.start_tokens  # this process's run
        return {
            "train_loss": m.get("train_loss"),
            "global_step": state.global_step,
            "resumed_from": self.checkpoint,
            "train_tokens": int(state.num_input_tokens_seen),
            "tokens_per_second": round(float(tokens) / max(seconds, 1e-9), 1),
            "samples_per_second": m.get("train_samples_per_second"),
            "train_runtime_seconds": round(seconds, 2),
            "wall_seconds": round(time.perf_counter() - self.t_start, 2),
            "world_size": self.args.world_size,
            "replicas_identical": self.replicas,  # null: one process
            **peak_memory_mb(),
            "slurm_job_id": env.slurm_job_id(),
        }

    def write_report(self, title: str, metrics: dict, sections: list[tuple[str, str]], images=(),
                     plot_title: str | None = None) -> None:
        """config.resolved.yaml, loss.png, report.md, and metrics.json last (it marks the run finished)."""
        atomic_write_text(self.out / "config.resolved.yaml", dump_config(self.cfg))
        plot = plot_loss(self._trainer.state.log_history, self.out / "loss.png", plot_title or title)
        write_report(self.out, title, metrics, sections, images=(["loss.png"] if plot else []) + list(images))
