"""Fill-mask: a masked LM (`hpcnlp pretrain`'s output). Exported with Optimum's own check; it has no
labelled data, so no fine-tuning, distillation, pruning or gate."""

from hpcnlp.tasks.base import Task

TASK = Task(
    name="fill-mask",
    architecture="ForMaskedLM",
    auto_model="AutoModelForMaskedLM",
    optimum_task="fill-mask",
    example_text="Paris is the [MASK] of France.",
)
