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
import os
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from hpcnlp.config import ConfigError, Problem, TrainingConfig, TrainingJobConfig, dump_config
from hpcnlp.report import plot_loss, write_report
from hpcnlp.runtime import env, gres, rundir, status
from hpcnlp.runtime.checkpoints import resume_target, trained_bf16
from hpcnlp.runtime.io import atomic_write_text, normal_mode
from hpcnlp.runtime.preempt import PreemptionCallback, requeue_exit
from hpcnlp.train import adapters, precision
from hpcnlp.train.callbacks import CheckpointMarker, ThroughputCallback, peak_memory_mb
from hpcnlp.train.replicas import replicas_identical
from hpcnlp.train.tracking import Tracking
from hpcnlp.train.watchdog import StepWatchdog

log = logging.getLogger(__name__)


def nvidia_driver() -> str:
    """The NVIDIA driver version nvidia-smi reports, or why there is none."""
    versions, why = gres.nvidia_smi()
    return versions[0] if versions else why


def cuda_guard(source: str = "<config>") -> None:
    """Slurm gave this job GPUs but torch sees none (a driver older than the wheels' CUDA, a container
    run without --nv, a CPU build of torch): refuse (exit 2) rather than train for hours on the CPU.
    HPCNLP_ALLOW_CPU=1 says it is meant (GRES that are not CUDA devices, a test site's fake GPUs)."""
    if not env.in_allocation() or env.hpcnlp_setting("ALLOW_CPU") == "1":
        return
    gpus = env.slurm_gpus_on_node()
    visible = (env.cuda_visible_devices() or "").strip()
    if (gpus <= 0 and visible in ("", "-1", "NoDevFiles")) or torch.cuda.is_available():
        return
    given = f"{gpus} GPU(s)" if gpus > 0 else f"CUDA_VISIBLE_DEVICES={visible}"
    raise ConfigError(
        source,
        [
            Problem(
                key="cuda",
                message=f"Slurm gave this job {given} but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none: a CPU build'}; "
                f"driver {nvidia_driver()})",
                fix="use a node whose NVIDIA driver supports that CUDA version (CUDA 13 wheels need driver >= 580), "
                "run the container with GPUs (apptainer --nv, pyxis, podman CDI), or submit without GPUs "
                "(HPCNLP_ALLOW_CPU=1: train on the CPU all the same)",
            )
        ],
    )


def training_arguments(t: TrainingConfig, output_dir: str, **job_settings) -> TrainingArguments:
    """`training:` as TrainingArguments, with what the job owns filled in (training_setup without a
    model shape or checkpoint: the probe of training.bf16: auto times BERT-base's matmuls)."""
    return training_setup(
        t, output_dir, precision.shape_of(None, t.per_device_train_batch_size, 128), None, **job_settings
    )[0]


def training_setup(
    t: TrainingConfig, output_dir: str, shape: precision.Shape, checkpoint: str | None, **job_settings
) -> tuple[TrainingArguments, precision.Choice]:
    """TrainingArguments and the bf16 choice (train/precision.py: `shape` is what the probe times; a run
    resuming `checkpoint` keeps its dtype). Refuses (ConfigError, exit 2) when Slurm gave the job GPUs
    that torch cannot use (cuda_guard)."""
    cuda_guard(output_dir)
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
    # auto is decided after a first TrainingArguments has set up the process group: rank 0 decides (one
    # probe, on an otherwise idle node) and every rank takes its choice, since ranks training in different
    # dtypes would not stay replicas. Probing on every rank and reducing would time N probes sharing the cores.
    kwargs["bf16"] = t.bf16 is True
    # TrainingArguments leaves ACCELERATE_MIXED_PRECISION set for the process (and its children) and only
    # ever sets it to a half dtype: after one bf16 job, a later fp32 job in the process (a local pipeline's
    # next stage) would autocast to bf16. The config decides, so whatever an earlier job left goes.
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    args = TrainingArguments(output_dir=output_dir, **kwargs)
    choice = None
    if args.process_index == 0:
        resumed = trained_bf16(checkpoint) if checkpoint else None
        choice = precision.decide(t.bf16, shape, bool(kwargs.get("fp16")), resumed)
    choice = from_rank_zero(choice)
    if choice.bf16 != args.bf16:
        args = TrainingArguments(output_dir=output_dir, **{**kwargs, "bf16": choice.bf16})
    if t.bf16 == "auto":
        log.info("training.bf16: auto -> %s: %s", choice.dtype, choice.reason)
    if choice.bf16 and not torch.cuda.is_available():
        precision.attention_in_fp32()
    return args, choice


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches drawn from (seed, epoch) alone. The stock sampler draws from the global
    RNG when an epoch starts, whose state differs in a run resumed mid-epoch: it would see other batches."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at each epoch, before iterating
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)


class PreparedOrderSampler(torch.utils.data.Sampler):
    """Prepared pretraining blocks come shuffled (data/pack.py `Blocks`): epoch 0 reads them in that order
    (sequential reads of the memory-mapped shards), later epochs in a permutation drawn from (seed, epoch)
    alone. Either way a resumed run sees the same batches, and accelerate's skip_first_batches skips the
    seen ones by index, reading no data."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's loader calls it at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if self.epoch == 0:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class ResumableTrainer(Trainer):
    """The Trainer every job uses: a resumed run sees the same batches as the uninterrupted one."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(dataset, "ordered", False):
            return PreparedOrderSampler(len(dataset), self.args.data_seed or self.args.seed)
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler = EpochSeededLengthGroupedSampler(
                sampler.batch_size, sampler.lengths, self.args.data_seed or self.args.seed
            )
        return sampler


def from_rank_zero(value):
    """Rank 0's value on every rank (one decision, so no rank goes on alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def on_any_rank(flag: bool, device) -> bool:
    """True on every rank when it is True on one (one decision, so no rank goes on alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


class StatusCallback(TrainerCallback):
    """status.json follows the run: step, loss, ETA at every logging step (rank 0)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            status.update(
                self.path,
                state="running",
                step=state.global_step,
                max_steps=state.max_steps,
                loss=logs["loss"],
                eta_seconds=logs.get("eta_seconds"),
            )


def deepspeed_comm(args: TrainingArguments) -> None:
    """DeepSpeed's comm layer on the process group, before any model loads. On CPU (use_cpu) accelerate
    sets up gloo without it, and ZeRO-3's zero.Init inside from_pretrained then takes the world for one
    process and refuses the batch sizes ("train_batch_size is not equal to ... 16 != 8 * 1 * 1"). On
    GPUs accelerate's DeepSpeed path has done it already: a second call changes nothing."""
    if args.deepspeed and args.world_size > 1:
        import deepspeed

        deepspeed.init_distributed()


class TrainingRun:
    def __init__(self, cfg: TrainingJobConfig, model_config: dict | None = None, **job_settings):
        """`model_config`: the config.json (or its sizes) of the model trained: training.bf16: auto's probe
        times its matmuls at the job's batch x max_seq_length tokens."""
        self.cfg, self.out, self.t_start = cfg, Path(cfg.output_dir), time.perf_counter()
        self.run_id = rundir.run_hash(cfg.model_dump(mode="json"))
        self.restarted = env.slurm_restart_count() > 0
        # Known before the TrainingArguments: a resumed run keeps the dtype its checkpoint trained in. A first
        # start with overwrite: true is a fresh run (the claim below moves the old one aside).
        fresh = cfg.overwrite and not self.restarted
        resumed = None if fresh else resume_target(cfg.resume, self.out, self.run_id, restarted=self.restarted)
        shape = precision.job_shape(cfg, model_config)
        self.args, self.bf16 = training_setup(cfg.training, cfg.output_dir, shape, resumed, **job_settings)
        deepspeed_comm(self.args)
        set_seed(self.args.seed)  # before any head is initialised
        self._claim()
        # Again, now that the dir is this run's: never a checkpoint the claim moved aside.
        self.checkpoint = resume_target(cfg.resume, self.out, self.run_id, restarted=self.restarted)
        self.tracking = Tracking(cfg, self.is_main)  # after claim: run.json holds this run's tracking ids
        self.result = None
        self.replicas: bool | None = None

    def _claim(self) -> None:
        """Rank 0 takes the output_dir's lock and makes it this run's (the previous run moved aside
        with overwrite: true) before any rank writes there; every rank learns the verdict. A finished
        run is final: rundir.Finished (exit 0), nothing trains again."""
        error, verdict = None, None
        if self.is_main:
            try:
                rundir.acquire(self.out)
                verdict = rundir.claim(
                    self.out,
                    self.run_id,
                    self.cfg.overwrite,
                    self.cfg.job,
                    self.cfg.resume,
                    self.restarted,
                    self.cfg.training.max_steps,
                )
                if verdict != rundir.FINISHED:
                    status.update(self.out / "status.json", state="running", job=self.cfg.job, reason=None)
            except rundir.OutputDirRefused as e:
                error = (str(e), e.fix)
        error, verdict = from_rank_zero((error, verdict))
        if error:
            raise ConfigError(self.cfg._source, [Problem(key="output_dir", message=error[0], fix=error[1])])
        if verdict == rundir.FINISHED:
            raise rundir.Finished(
                f"'{self.cfg.output_dir}' holds this run, finished: nothing to train (overwrite: true trains it "
                "again from scratch; resume: continue with a higher training.max_steps goes on from its checkpoint)"
            )

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0

    def trainer(self, trainer_class=ResumableTrainer, callbacks=(), **kwargs) -> Trainer:
        a = self.args
        self.throughput = ThroughputCallback(
            a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        )
        self.preemption = PreemptionCallback(self.cfg.output_dir)
        self.marker = CheckpointMarker(self.run_id)
        own = [
            self.throughput,
            self.preemption,
            self.marker,
            StatusCallback(self.out / "status.json"),
            StepWatchdog(self.cfg.output_dir, self.cfg.step_timeout_minutes),
        ]
        self._trainer = trainer_class(args=a, callbacks=[*own, *callbacks], **kwargs)
        self._trainer.remove_callback(PrinterCallback)  # ThroughputCallback logs instead
        self.tracking.attach(self._trainer)
        return self._trainer

    def train(self) -> int | None:
        """Train (resuming when configured or requeued). None when finished and the ranks agree;
        else the exit code: REQUEUE_EXIT after a preemption checkpoint, 1 when replicas drifted."""
        if self.checkpoint:
            log.info("resuming from %s", self.checkpoint)
        # Installed only now, after data preparation: forked prepare workers never see our handlers
        # (the job's early ones, preempt.arm, pass a signal on to them).
        self.preemption.install_handlers()
        if on_any_rank(self.preemption.requested, self.args.device):  # a signal before training began
            self.preemption.restore_handlers()
            return requeue_exit(0)  # nothing new to save: a requeue resumes the newest checkpoint
        try:
            self.result = self._trainer.train(resume_from_checkpoint=self.checkpoint)
        except BaseException:
            self.tracking.close("FAILED")
            raise
        finally:
            self.preemption.restore_handlers()
        state = self._trainer.state
        if self.preemption.stopped and state.global_step < state.max_steps:
            if self.marker.last_marked != state.global_step:  # the save raised, or was never asked for
                raise RuntimeError(f"preemption: checkpoint-{state.global_step} was not saved completely")
            self.tracking.close("KILLED")  # the next start continues the same tracking runs
            return requeue_exit(state.global_step)
        if self.preemption.requested:  # after the last step: the run is done, finish it
            log.warning("preemption signal after the last training step: finishing the run")
        self.replicas = replicas_identical(self._trainer.model)  # False: ranks drifted apart (logged)
        return 1 if self.replicas is False else None

    def save(self) -> None:
        """The model (safetensors), its config and tokenizer into output_dir (rank 0 writes). An adapter
        model writes the adapter alone to output_dir/adapter/, then is merged (every rank, the same
        arithmetic) and saved like any model; the trainer goes on with the merged one."""
        model = self._trainer.model
        if adapters.is_adapter_model(model):
            if self.is_main:
                adapters.save_adapter(model, self.out / "adapter")
            self._trainer.model = model.merge_and_unload()
        self._trainer.save_model(self.cfg.output_dir)
        if self.is_main:
            (self.out / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.resolved.yaml says it
            for f in self.out.iterdir():  # safetensors writes 0600 whatever the umask: results are shared
                if f.is_file():
                    normal_mode(f)

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
            "mixed_precision": self._trainer.accelerator.mixed_precision,  # "bf16": the Trainer's autocast ran
            **self.bf16.metrics(),  # why that dtype (training.bf16: auto: the probe's two rates)
            "replicas_identical": self.replicas,  # null: one process
            **peak_memory_mb(),
            "slurm_job_id": env.slurm_job_id(),
        }

    def write_report(
        self, title: str, metrics: dict, sections: list[tuple[str, str]], images=(), plot_title: str | None = None
    ) -> None:
        """config.resolved.yaml, loss.png, report.md, and metrics.json last (it marks the run finished)."""
        atomic_write_text(self.out / "config.resolved.yaml", dump_config(self.cfg))
        plot = plot_loss(self._trainer.state.log_history, self.out / "loss.png", plot_title or title)
        images = (["loss.png"] if plot else []) + list(images)
        write_report(self.out, title, metrics, sections, images=images)
        names = ["report.md", "metrics.json", "config.resolved.yaml", *images]
        self.tracking.log_files([self.out / n for n in names])
        self.tracking.close()
        rundir.finish(self.out)  # the previous run moved aside by overwrite: gone only now
