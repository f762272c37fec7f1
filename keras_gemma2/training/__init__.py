"""Training on top of `keras_gemma2.data` and `keras_gemma2.models`: fitting
loops, supervised fine-tuning (response-only loss), LoRA and PEFT adapters,
resumable runs, knowledge distillation.

May import `data`, `generation` and `checkpoints`; nothing below imports it.
"""

from keras_gemma2.training.distill import distill
from keras_gemma2.training.distillation_loss import (
    LogitsKLDistillation,
    distillation_loss,
    token_distillation_losses,
)
from keras_gemma2.training.distiller import Gemma2Distiller
from keras_gemma2.training.finetune import finetune, fit_rows, load_finetuned
from keras_gemma2.training.fit_on_windows import fit_on_windows
from keras_gemma2.training.lora import LoraEinsumDense
from keras_gemma2.training.on_policy import on_policy_batch
from keras_gemma2.training.peft_adapter import read_peft_adapter, save_peft_adapter
from keras_gemma2.training.response_loss import preprocess_rows, response_loss
from keras_gemma2.training.resumable_fit import fit_resumable, latest_checkpoint
from keras_gemma2.training.sft_jsonl import bundled_dataset_path, read_sft_jsonl
from keras_gemma2.training.teacher_store import (
    read_teacher_store,
    store_bytes_per_token,
    teacher_fingerprint,
    write_teacher_store,
)
from keras_gemma2.training.topk_distillation import (
    teacher_topk,
    topk_distillation_loss,
    topk_token_distillation_losses,
)

__all__ = [
    "Gemma2Distiller",
    "LogitsKLDistillation",
    "LoraEinsumDense",
    "bundled_dataset_path",
    "distill",
    "distillation_loss",
    "finetune",
    "fit_on_windows",
    "fit_resumable",
    "fit_rows",
    "latest_checkpoint",
    "load_finetuned",
    "on_policy_batch",
    "preprocess_rows",
    "read_peft_adapter",
    "read_sft_jsonl",
    "read_teacher_store",
    "response_loss",
    "save_peft_adapter",
    "store_bytes_per_token",
    "teacher_fingerprint",
    "teacher_topk",
    "token_distillation_losses",
    "topk_distillation_loss",
    "topk_token_distillation_losses",
    "write_teacher_store",
]
