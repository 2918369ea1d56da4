"""Recovery: fine-tuning of a compressed model that stays compressed.

Either LoRA or every weight trains. The factor pairs of a LowRankLinear are plain nn.Linear
layers, so LoRA (PEFT) attaches to them like to any dense projection, and merging writes B @ A
into each factor in place; full fine-tuning trains the factors themselves. Either way the model
never grows back, and the recovered checkpoint has exactly the parameters of its source.

    checkpoint DIR -> LoRA on every decoder linear (dense and factors), or every weight (--full)
      -> loss: next-token, distillation from a teacher (--teacher), or a mix (objective.py)
      -> seeded training (AdamW, warmup + linear decay), periodic resumable checkpoints
      -> best state by held-out loss -> merge (LoRA) -> checkpoint DIR2 (same shapes, same count)

Resumption is bit-exact: a work folder holds the trained weights, optimizer and RNG state at the
last periodic checkpoint; the data order is a pure function of (seed, epoch), so the step number
alone says where in the data a run stands.
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorapError
from ..log import info
from .config import RecoveryConfig
from .data import prepare_data, resolve_data
from .full import check_memory, make_fully_trainable
from .heldout import HeldOut, scored_count
from .lora import attach_lora, load_trainable_state, lora_target_names
from .objective import Objective
from .report import format_recovery
from .schedule import Schedule
from .teacher import BASE, load_teacher
from .training import TrainingJob, train
from .work_folder import WorkFolder

__all__ = ["Recovered", "RecoveryConfig", "format_recovery", "recover"]

RECOVERY_REPORT_FILE = "recovery_report.json"
ADAPTER_FOLDER = "adapter"
# Settings that change no trained weight: they may differ between a run and its resumption.
RESUME_FREE_SETTINGS = ("max_minutes", "save_every", "device")
# Settings newer than some work folders, and what a run started before each existed did: its
# resumption compares as if it had been given that value.
SETTINGS_ADDED_LATER = {"data_mix": "size", "decay_steps": None, "budget_decay": False}


@dataclass
class Recovered:
    """What recover() returns: the merged model, its tokenizer and the report (as saved)."""

    model: object
    tokenizer: object
    report: dict = field(default_factory=dict)


def _weights_signature(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def default_work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.recovery"


@dataclass
class Prepared:
    """A run ready to train: where it reads and writes, its data, its models and its resumption."""

    config: RecoveryConfig
    source: Path
    out: Path
    work: WorkFolder
    compressed: bool  # a lorap checkpoint, or a dense model fine-tuned as a control
    device: object
    data_source: str
    tokenizer: object
    data: object  # RecoveryData
    schedule: Schedule
    run: dict  # what run.json records, and a resumption must match
    resume_state: str | None
    student: object = None  # the model with LoRA attached, or the model itself with --full
    teacher: object = None
    teacher_described: str | None = None
    stored_dtype: object = None  # the source's dtype: the recovered model is saved in it
    parameters_before: int = 0
    started: float = 0.0  # time.perf_counter() when the run began


def recover(
    checkpoint,
    out,
    config: RecoveryConfig | None = None,
    work_dir=None,
    resume: bool = False,
    overwrite: bool = False,
    keep_adapter: bool = False,
    progress: bool = True,
    on_step=None,
    **settings,
) -> Recovered:
    """Fine-tune the lorap checkpoint `checkpoint` (LoRA, merged; or every weight with `full`) and
    save it to `out`. A dense model folder is accepted too, and fine-tuned the same way: the control
    that shows how much of a gain on the training domain is adaptation rather than recovery.

    `settings` are RecoveryConfig fields (data, epochs, max_steps, max_minutes, lr, lora_r, ...).
    Periodic checkpoints go to `work_dir` (default: a hidden folder beside `out`); with
    `resume`, a run continues from its last one exactly as if never interrupted. `on_step(step,
    loss)` is called after every optimizer step. (Nine parameters: this is the public API, and
    everything that changes what is trained is in `config`; the rest say where and how to run.)
    """
    config = config or RecoveryConfig(**settings)
    prepared = prepare(checkpoint, out, config, work_dir, resume, overwrite, keep_adapter)
    state, best, stopped_by = train(_training_job(prepared), prepared.resume_state, progress, on_step)
    prepared.teacher = None  # the teacher's memory is not needed to merge and save
    merged, adapter_staging = merge(prepared, best, keep_adapter)
    report = _report(prepared, merged, state, stopped_by)
    save(prepared, merged, report, overwrite, adapter_staging)
    if stopped_by == "schedule":
        prepared.work.remove()
    info(f"recovered checkpoint written to {prepared.out} ({report['parameters']:,} parameters, as before)")
    return Recovered(merged, prepared.tokenizer, report)


def prepare(checkpoint, out, config: RecoveryConfig, work_dir, resume: bool, overwrite: bool,
            keep_adapter: bool) -> Prepared:
    """Check the settings and folders, load the teacher (first: one that cannot teach is refused
    before any other work), the data and the student, and decide whether the run resumes."""
    from transformers import AutoConfig, AutoTokenizer

    from ..devices import resolve_device

    started = time.perf_counter()  # a time budget counts from here
    config.validate()
    source, out, work, compressed = _folders(checkpoint, out, config, work_dir, overwrite, keep_adapter)
    device = resolve_device(config.device)
    data_source = resolve_data(config.data)
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = teacher_described = None
    if config.distills:
        teacher, teacher_described = load_teacher(config.teacher, source, tokenizer, AutoConfig.from_pretrained(source),
                                                  device)
    info(f"recovery data: {data_source} (cutoff {config.cutoff} tokens)")
    data = prepare_data(tokenizer, data_source, config)
    schedule = Schedule(len(data.train), config.batch_size, config.grad_accum, config.epochs, config.max_steps,
                        config.warmup_steps, config.lr, config.seed, config.decay_steps)
    run = _run_record(source, data_source, data, config, schedule)
    prepared = Prepared(config, source, out, work, compressed, device, data_source, tokenizer, data, schedule, run,
                        _check_resume(work, run, resume), teacher=teacher, teacher_described=teacher_described,
                        started=started)
    info(f"{len(data.train)} training and {len(data.validation)} held-out examples ({data.description['format']}); "
         f"{schedule.total_steps} steps of {config.batch_size * config.grad_accum} examples "
         f"({schedule.steps_per_epoch} per epoch)")
    _load_student(prepared)
    if prepared.resume_state is None:
        work.start(run)
    return prepared


def _folders(checkpoint, out, config: RecoveryConfig, work_dir, overwrite: bool, keep_adapter: bool) -> tuple:
    """(source, out, work folder, whether the source is a lorap checkpoint), each checked."""
    from ..io.checkpoint import check_output_folder
    from ..io.models import is_lorap_checkpoint

    source = Path(checkpoint).expanduser().resolve()
    if not source.is_dir() or not (source / "config.json").is_file():
        raise LorapError(f"{checkpoint} is not a lorap checkpoint folder (made by `lorap compress`) or a model folder")
    compressed = is_lorap_checkpoint(source)
    if not compressed and config.teacher == BASE:
        raise LorapError(f"{checkpoint} is a dense model, not a lorap checkpoint, so it has no base model to distil "
                         "from: name the teacher (--teacher MODEL) or train without one")
    out = check_output_folder(out, overwrite, protected=[source])
    work = WorkFolder(Path(work_dir).expanduser().resolve() if work_dir else default_work_dir(out))
    if work.path == out or out in work.path.parents or source in work.path.parents or work.path == source:
        raise LorapError(f"the work folder {work.path} must lie outside both the source and the output")
    if keep_adapter and config.full:
        raise LorapError("--keep-adapter keeps a LoRA adapter, and --full trains the weights themselves: drop one of them")
    return source, out, work, compressed


def _run_record(source: Path, data_source: str, data, config: RecoveryConfig, schedule: Schedule) -> dict:
    """What the work folder records of a run: a resumption must match it."""
    return {
        "source": str(source),
        "source_weights": _weights_signature(source),
        "data": data_source,
        "settings": {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE_SETTINGS
                     and not (k == "data_mix" and "sources" not in data.description)},  # one source: no mix
        "train_examples": len(data.train),
        "total_steps": schedule.total_steps,
    }


def _load_student(prepared: Prepared) -> None:
    """The source in float32 on the device, with LoRA attached or every weight made trainable."""
    import torch
    from transformers import AutoConfig

    from ..io.checkpoint import load_checkpoint_model
    from ..plan.counting import count_parameters

    config, source = prepared.config, prepared.source
    source_config = AutoConfig.from_pretrained(source)
    stored_dtype = getattr(source_config, "dtype", None) or getattr(source_config, "torch_dtype", None)
    prepared.stored_dtype = getattr(torch, stored_dtype, None) if isinstance(stored_dtype, str) else stored_dtype
    if prepared.compressed:
        model = load_checkpoint_model(source, dtype=torch.float32).to(prepared.device)
    else:  # a dense model, fine-tuned the same way: the control that tells recovery from domain adaptation
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(prepared.device)
    prepared.parameters_before = count_parameters(model)
    model.config.use_cache = False
    if getattr(model, "supports_gradient_checkpointing", False):
        # Backward keeps each decoder layer's input and recomputes the layer from it, one at a time,
        # instead of keeping every layer's activations: the same values (dropout's RNG is replayed)
        # for one more forward pass of the student per step, and the bulk of training's memory saved.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.full:
        make_fully_trainable(model, config.train_embeddings)
        check_memory(model, prepared.teacher, prepared.device, config.batch_size, config.cutoff)
        prepared.student = model
    else:
        prepared.student = attach_lora(model, config)


def _training_job(prepared: Prepared) -> TrainingJob:
    config, data = prepared.config, prepared.data
    tokenizer = prepared.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    held_out = HeldOut(data.validation, scored_count(config, len(data.validation), prepared.schedule.total_steps),
                       config.batch_size, pad_id, prepared.device)
    objective = Objective(prepared.student, prepared.teacher, config.kd_weight, config.kd_temperature,
                          config.kd_hidden_weight)
    return TrainingJob(objective, data, held_out, config, prepared.schedule, prepared.work, pad_id, prepared.device,
                       prepared.started)


def merge(prepared: Prepared, best: dict, keep_adapter: bool) -> tuple:
    """The best state by held-out loss, merged (LoRA) into a model with the source's parameter count,
    dtype and no gradients, on the CPU; and the staging folder of the unmerged adapter when kept."""
    import torch

    from ..plan.counting import count_parameters

    student = prepared.student
    load_trainable_state(student, best)
    student.eval()
    adapter_staging = None
    if keep_adapter:
        out = prepared.out
        adapter_staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.adapter-", dir=out.parent))
        student.save_pretrained(adapter_staging)
    merged = student if prepared.config.full else student.merge_and_unload()
    prepared.student = None
    merged.requires_grad_(False)
    parameters_after = count_parameters(merged)
    if parameters_after != prepared.parameters_before:  # the promise of this module: never grows back
        raise LorapError(f"merging changed the parameter count ({prepared.parameters_before} -> {parameters_after})")
    merged.config.use_cache = True
    if isinstance(prepared.stored_dtype, torch.dtype) and prepared.stored_dtype != torch.float32:
        merged.to(prepared.stored_dtype)
    merged.to("cpu")
    return merged, adapter_staging


def _report(prepared: Prepared, merged, state, stopped_by: str) -> dict:
    """The recovery record (also written into the model's config.lorap) and the report around it."""
    from ..devices import peak_memory
    from ..provenance import environment

    recovery = _recovery_record(prepared, merged, state, stopped_by)
    if prepared.compressed:
        previous = merged.config.lorap.get("recovery")
        merged.config.lorap = {**merged.config.lorap, "recovery": {**recovery, **({"previous": previous} if previous else {})}}
    return {
        **recovery,
        "output": str(prepared.out),
        "history": {"train": state.train_history, "validation": state.validation_history},
        "total_seconds": round(time.perf_counter() - prepared.started, 1),
        "peak_memory": peak_memory(prepared.device),
        **environment(str(prepared.device)),
    }


def _recovery_record(prepared: Prepared, merged, state, stopped_by: str) -> dict:
    from ..plan.counting import count_parameters

    config, schedule = prepared.config, prepared.schedule
    return {
        "source": str(prepared.source),
        "data": prepared.data.description,
        "settings": {**config.to_dict(), "data": prepared.data_source},
        "method": "full" if config.full else "lora",
        **({"trained": "every weight but the embeddings and LM head" if not config.train_embeddings
            else "every weight"} if config.full else
           {"lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                     "targets": "every nn.Linear in the decoder layers (dense projections and both factors)",
                     "target_modules": len(lora_target_names(merged)), "merged": True}}),
        "loss": _loss_description(config, prepared.teacher_described),
        "steps": state.step,
        "total_steps": schedule.total_steps,
        "epochs_done": round(state.step / schedule.steps_per_epoch, 4),
        "tokens_seen": state.tokens_seen,
        "stopped_by": stopped_by,
        "learning_rate": {"peak": config.lr, "warmup_steps": schedule.warmup_steps, "decay_ends_at_step": schedule.horizon,
                          "with_time_budget": config.max_minutes is not None and config.budget_decay,
                          "last": state.last_lr},
        "validation_examples_scored": state.validation_scored,
        "validation_loss_before": state.validation_history[0][1],
        "validation_nll_before": state.validation_history[0][2],
        "best_validation_nll": next(entry[2] for entry in state.validation_history if entry[0] == state.best_step),
        "best_step": state.best_step,
        "best_validation_loss": state.best_loss,
        "train_seconds": round(state.elapsed_s, 1),
        "parameters": count_parameters(merged),
    }


def save(prepared: Prepared, merged, report: dict, overwrite: bool, adapter_staging: Path | None) -> None:
    """Write the recovered checkpoint (with its reports, and the adapter when kept) atomically."""
    from ..io.checkpoint import REPORT_FILE, save_checkpoint

    extra = {RECOVERY_REPORT_FILE: report}
    if (prepared.source / REPORT_FILE).is_file():
        extra[REPORT_FILE] = json.loads((prepared.source / REPORT_FILE).read_text())
    try:
        save_checkpoint(merged, prepared.tokenizer, prepared.out, overwrite, extra)
        if adapter_staging is not None:
            os.rename(adapter_staging, prepared.out / ADAPTER_FOLDER)
    finally:
        if adapter_staging is not None and adapter_staging.exists():
            shutil.rmtree(adapter_staging, ignore_errors=True)


def _loss_description(config: RecoveryConfig, teacher_described: str | None) -> dict:
    if teacher_described is None:
        return {"next_token": 1.0}
    description = {"next_token": round(1 - config.kd_weight, 6), "distillation": config.kd_weight,
                   "kind": "forward KL(teacher || student) at the temperature, times its square",
                   "temperature": config.kd_temperature, "teacher": teacher_described}
    if config.kd_hidden_weight > 0:
        description["layer_outputs"] = config.kd_hidden_weight
    return description


def _check_resume(work: WorkFolder, run: dict, resume: bool):
    """'checkpoint' to continue from the work folder, or None to start afresh."""
    if not work.has_checkpoint():
        if resume:
            info(f"nothing to resume in {work.path}; starting from the beginning")
        work.remove()  # what a run that stopped before its first checkpoint left
        return None
    if not resume:
        raise LorapError(
            f"{work.path} holds an unfinished recovery run; pass --resume to continue it, "
            "or delete that folder to start over"
        )
    saved = work.read_run()
    for name, before in SETTINGS_ADDED_LATER.items():  # a run started before a setting existed did `before`
        if saved and name in run["settings"]:
            saved.get("settings", {}).setdefault(name, before)
    if saved != run:
        changed = sorted(k for k in set(run) | set(saved or {}) if (saved or {}).get(k) != run.get(k))
        started = ""
        if "settings" in changed:
            old, new = (saved or {}).get("settings", {}), run["settings"]
            settings = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            changed += [f"settings.{k}" for k in settings]
            # The values to pass again, e.g. a default that changed since (--lr of --full: 1e-4, now 2e-4).
            if any(k in old for k in settings):
                started = "; it was started with " + ", ".join(f"{k}={old[k]!r}" for k in settings if k in old)
        raise LorapError(
            f"cannot resume: the run in {work.path} was started differently ({', '.join(changed)} differ{started}). "
            "Use the same source, data and settings (only --max-minutes and --save-every may change), "
            "or delete that folder to start over"
            + (" (a run started before --data-mix pooled its sources by size: add --data-mix size)"
               if "settings.data_mix" in changed else "")
        )
    return "checkpoint"
