"""Recovery: LoRA fine-tuning of a compressed model that stays compressed.

The factor pairs of a LowRankLinear are plain nn.Linear layers, so LoRA (PEFT) attaches to
them like to any dense projection, and merging writes B @ A into each factor in place: the
model never grows back, and the recovered checkpoint has exactly the parameters of its source.

    checkpoint DIR -> LoRA on every linear layer of the decoder (dense and factors)
      -> seeded training (AdamW, warmup + linear decay), periodic resumable checkpoints
      -> best adapter by validation loss -> merge -> checkpoint DIR2 (same shapes, same count)

Resumption is bit-exact: a work folder holds the adapter, optimizer and RNG state at the last
periodic checkpoint; the data order is a pure function of (seed, epoch), so the step number
alone says where in the data a run stands.
"""
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LorapError
from ..log import info

RECOVERY_REPORT_FILE = "recovery_report.json"
ADAPTER_FOLDER = "adapter"
CHECKPOINT_FOLDER = "checkpoint"
RUN_FILE = "run.json"
DEFAULT_HUB_DATA = "alpaca"  # yahma/alpaca-cleaned, as in method.md
OFFLINE_DATA = "wiki"
MAX_GRAD_NORM = 1.0  # as transformers.Trainer (and so LLM-Pruner's post-training) clips
# Settings that change no trained weight: they may differ between a run and its resumption.
RESUME_FREE_SETTINGS = ("max_minutes", "save_every", "device")


@dataclass
class RecoveryConfig:
    """One recovery run. Defaults follow method.md: r 8, alpha 16, dropout 0.05, lr 1e-4,
    2 epochs, cutoff 256 tokens, 2000 held-out examples (at most 5% of the data)."""

    data: str | None = None  # None: alpaca-cleaned when the hub can be reached, else wiki (train)
    epochs: int = 2
    max_steps: int | None = None  # the schedule ends here (warmup and decay are fitted to it)
    max_minutes: float | None = None  # training time budget, over all resumptions
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    cutoff: int = 256  # tokens per example (a text window, or a truncated instruction)
    batch_size: int = 4
    grad_accum: int = 1
    val_size: int | None = None  # held-out examples; None: min(2000, 5% of the data)
    max_examples: int | None = None  # use at most this many training examples
    warmup_steps: int | None = None  # None: min(100, 10% of the steps)
    eval_every: int = 100
    save_every: int = 50
    seed: int = 0
    device: str | None = None

    def validate(self) -> None:
        positive = {
            "epochs": self.epochs,
            "lora_r": self.lora_r,
            "cutoff": self.cutoff,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
        }
        for name in ("max_steps", "val_size", "max_examples"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise LorapError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise LorapError(f"warmup steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise LorapError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise LorapError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_alpha > 0:
            raise LorapError(f"LoRA alpha must be positive, got {self.lora_alpha}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise LorapError(f"--max-minutes must be positive, got {self.max_minutes}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RecoveryData:
    """Tokenized examples: (input_ids, labels) lists, labels -100 where nothing is learned."""

    train: list
    validation: list
    description: dict


@dataclass
class Recovered:
    """What recover() returns: the merged model, its tokenizer and the report (as saved)."""

    model: object
    tokenizer: object
    report: dict = field(default_factory=dict)


# ---------------------------------------------------------------- data


def resolve_data(source: str | None) -> str:
    if source is not None:
        return source
    from ..io.network import hub_reachable

    return DEFAULT_HUB_DATA if hub_reachable() else OFFLINE_DATA


def _text_windows(stream, cutoff: int) -> list:
    count = stream.numel() // cutoff
    windows = stream[: count * cutoff].view(count, cutoff).tolist()
    return [(ids, ids) for ids in windows]


def load_examples(tokenizer, source: str, cutoff: int):
    """All examples of a source and a description of what they are (format, counts)."""
    from ..io import data, instructions

    path = Path(source.split(".jsonl:")[0] + (".jsonl" if ".jsonl:" in source else "")).expanduser()
    records = documents = None
    if source == "wiki" or source in data.HUB_CORPORA:
        stream = data.token_stream(tokenizer, source, "train")
        return _text_windows(stream, cutoff), {"format": "text", "split": "train", "dropped": 0}
    if path.suffix in (".json", ".jsonl", ".txt"):
        if not path.is_file():
            raise LorapError(f"recovery data file not found: {path}")
        if path.suffix == ".json":
            records = instructions.check_records(instructions.read_local_records(path), str(path))
        elif path.suffix == ".jsonl" and ".jsonl:" not in source:
            first = next(iter(instructions.read_local_records(path)), None)
            if instructions.is_instruction_record(first):
                records = instructions.check_records(instructions.read_local_records(path), str(path))
        if records is None:
            documents = data.local_documents(source)
    else:
        records, documents = instructions.hub_data(source)
    if records is not None:
        examples, dropped = instructions.encode_records(tokenizer, records, cutoff)
        if not examples:
            raise LorapError(f"{source}: no record has a response within the cutoff of {cutoff} tokens")
        return examples, {"format": "instructions", "prompt": "alpaca", "dropped": dropped}
    import torch

    text = data.DOCUMENT_SEPARATOR.join(documents)
    stream = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    return _text_windows(stream, cutoff), {"format": "text", "dropped": 0}


def prepare_data(tokenizer, source: str, config: RecoveryConfig) -> RecoveryData:
    """Examples split by a seeded shuffle into held-out validation and training."""
    import torch

    examples, description = load_examples(tokenizer, source, config.cutoff)
    val_size = config.val_size if config.val_size is not None else min(2000, max(1, len(examples) // 20))
    if len(examples) < val_size + 1:
        raise LorapError(
            f"'{source}' gives {len(examples)} examples of at most {config.cutoff} tokens: too few for "
            f"{val_size} held out and some to train on. Use a larger corpus, a smaller --cutoff or --val-size."
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
    validation = [examples[i] for i in order[:val_size]]
    train = [examples[i] for i in sorted(order[val_size:])]
    if config.max_examples is not None:
        train = train[: config.max_examples]
    description.update(
        source=source,
        cutoff=config.cutoff,
        train_examples=len(train),
        validation_examples=len(validation),
        train_tokens=sum(len(ids) for ids, _ in train),
    )
    return RecoveryData(train, validation, description)


def collate(examples: list, pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    import torch

    from ..io.instructions import IGNORE_INDEX

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(targets)] = torch.tensor(targets)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


# ---------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """Which examples each optimizer step sees and at what learning rate: pure functions of the
    step number, so a resumed run continues exactly where its checkpoint stopped."""

    train_examples: int
    batch_size: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    warmup: int | None
    lr: float
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_examples / (self.batch_size * self.grad_accum))

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps is not None else total

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.total_steps // 10)

    def epoch_order(self, epoch: int) -> list:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 1)
        return torch.randperm(self.train_examples, generator=generator).tolist()

    def micro_batches(self, step: int, order_cache: dict) -> list:
        """Example indices of each micro-batch of optimizer step `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch not in order_cache:
            order_cache.clear()
            order_cache[epoch] = self.epoch_order(epoch)
        per_step = self.batch_size * self.grad_accum
        chosen = order_cache[epoch][position * per_step : (position + 1) * per_step]
        return [chosen[i : i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, then linear decay to zero at the last step (0-based step)."""
        warmup, total = self.warmup_steps, self.total_steps
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * max(0.0, (total - step) / max(1, total - warmup))


# ---------------------------------------------------------------- LoRA


def lora_target_names(model) -> list:
    """Full names of every nn.Linear inside the decoder layers: dense projections and both
    factors of each LowRankLinear (PEFT can only wrap the Linear leaves, not the pair)."""
    from torch import nn

    from ..architectures import Architecture

    names = {id(module): name for name, module in model.named_modules()}
    targets = []
    for layer in Architecture(model.config).decoder_layers(model):
        targets += [names[id(module)] for module in layer.modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise LorapError("the model has no linear layers in its decoder layers to attach LoRA to")
    return targets


def attach_lora(model, config: RecoveryConfig):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from the global RNG
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_names(model),
        bias="none",
    )
    return get_peft_model(model, lora)


def trainable_state(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise LorapError("the saved adapter does not match this model's LoRA layers; was the run started differently?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


# ---------------------------------------------------------------- training


def batch_loss_sum(model, batch, device):
    """Summed token NLL of a batch and the number of predicted tokens."""
    import torch

    from ..io.instructions import IGNORE_INDEX

    input_ids, mask, labels = (t.to(device) for t in batch)
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int((targets != IGNORE_INDEX).sum())


def validation_loss(model, examples: list, batch_size: int, pad_id: int, device) -> float:
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            nll, count = batch_loss_sum(model, collate(examples[start : start + batch_size], pad_id), device)
            total += float(nll.double())
            tokens += count
    model.train(was_training)
    return total / max(1, tokens)


class StopRequest:
    """Turns the first Ctrl-C (or SIGTERM) into a request to stop after the current step, with
    a checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        info("stopping after this step (a checkpoint will be saved); press Ctrl-C again to abort at once")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


@dataclass
class TrainingState:
    step: int = 0
    elapsed_s: float = 0.0
    best_step: int | None = None
    best_loss: float | None = None
    train_history: list = field(default_factory=list)  # [step, loss]
    validation_history: list = field(default_factory=list)  # [step, loss]
    sessions: int = 0
    tokens_seen: int = 0  # predicted (supervised) tokens trained on


class WorkFolder:
    """The resumable state of a run: run.json (what is being trained) and checkpoint/ (adapter,
    best adapter, optimizer, RNG and counters), replaced atomically as a whole."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FOLDER

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / "state.json").is_file()

    def read_run(self) -> dict | None:
        run = self.path / RUN_FILE
        return json.loads(run.read_text()) if run.is_file() else None

    def start(self, run: dict) -> None:
        from ..io.files import write_json_atomic

        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / RUN_FILE, run)

    def save(self, model, optimizer, state: TrainingState, best: dict) -> None:
        import torch
        from safetensors.torch import save_file

        from ..io.checkpoint import swap_into_place

        staging = Path(tempfile.mkdtemp(prefix=".checkpoint.partial-", dir=self.path))
        try:
            save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, staging / "adapter.safetensors")
            save_file({k: v.contiguous() for k, v in best.items()}, staging / "best.safetensors")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, staging / "optimizer.pt")
            (staging / "state.json").write_text(json.dumps(asdict(state)) + "\n")
            swap_into_place(staging, self.checkpoint)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def load(self, model, optimizer):
        import torch
        from safetensors.torch import load_file

        load_trainable_state(model, load_file(self.checkpoint / "adapter.safetensors"))
        best = load_file(self.checkpoint / "best.safetensors")
        saved = torch.load(self.checkpoint / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        state = TrainingState(**json.loads((self.checkpoint / "state.json").read_text()))
        return state, best

    def remove(self) -> None:
        """Delete what this run wrote (never anything else a --work-dir may hold), then the folder if empty."""
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        for partial in self.path.glob(".checkpoint.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
        (self.path / RUN_FILE).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass


def train(model, data: RecoveryData, config: RecoveryConfig, schedule: Schedule, work: WorkFolder, pad_id: int,
          device, resume_state=None, progress=True, on_step=None):
    """The training loop. Returns (state, best adapter weights, what stopped it)."""
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if resume_state == "checkpoint":
        state, best = work.load(model, optimizer)
        info(f"resuming at step {state.step} of {schedule.total_steps} from {work.checkpoint}")
    else:
        state, best = TrainingState(), None
    state.sessions += 1
    total = schedule.total_steps
    budget_s = config.max_minutes * 60 if config.max_minutes is not None else None
    session_start, elapsed_before = time.perf_counter(), state.elapsed_s

    def elapsed():
        return elapsed_before + time.perf_counter() - session_start

    def evaluate():
        loss = validation_loss(model, data.validation, config.batch_size, pad_id, device)
        state.validation_history.append([state.step, loss])
        nonlocal best
        if state.best_loss is None or loss < state.best_loss:
            state.best_step, state.best_loss, best = state.step, loss, trainable_state(model)
        return loss

    if not state.validation_history:  # the starting point is a candidate too: never end worse
        info(f"validation loss before training: {evaluate():.4f} ({len(data.validation)} held-out examples)")
    stopped_by = "schedule"
    order_cache: dict = {}
    bar = tqdm(total=total, initial=state.step, desc="recovery", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    with StopRequest() as stop, bar:
        while state.step < total:
            micro = [collate([data.train[i] for i in indices], pad_id)
                     for indices in schedule.micro_batches(state.step, order_cache)]
            tokens = sum(int((labels[:, 1:] != -100).sum()) for _, _, labels in micro)
            step_nll = 0.0
            for batch in micro:
                nll, _ = batch_loss_sum(model, batch, device)
                (nll / max(1, tokens)).backward()
                step_nll += float(nll.detach())
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            lr = schedule.lr_at(state.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens
            loss = step_nll / max(1, tokens)
            if not math.isfinite(loss):
                raise LorapError(f"training diverged at step {state.step} (loss {loss}); try a lower --lr")
            state.train_history.append([state.step, loss])
            out_of_time = budget_s is not None and elapsed() >= budget_s and state.step < total
            if state.step % config.eval_every == 0 or state.step == total or out_of_time:
                evaluate()
            state.elapsed_s = elapsed()
            saved = state.step % config.save_every == 0 or out_of_time
            if saved:
                work.save(model, optimizer, state, best)
            recent = [l for _, l in state.train_history[-20:]]
            postfix = {"loss": f"{sum(recent) / len(recent):.4f}", "lr": f"{lr:.2e}"}
            if state.validation_history:
                postfix["val"] = f"{state.validation_history[-1][1]:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(state.step, loss)
            if stop.requested:
                if not saved:
                    work.save(model, optimizer, state, best)
                info(f"interrupted at step {state.step} of {total}; checkpoint saved in {work.path}. "
                     "Run the same command with --resume to continue.")
                raise KeyboardInterrupt
            if out_of_time:
                stopped_by = "max_minutes"
                info(f"time budget of {config.max_minutes} min reached at step {state.step} of {total}; "
                     f"checkpoint kept in {work.path} (--resume with a larger --max-minutes continues)")
                break
    state.elapsed_s = elapsed()
    return state, best, stopped_by


# ---------------------------------------------------------------- the whole run


def _weights_signature(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def default_work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.recovery"


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
    """LoRA-fine-tune the lorap checkpoint `checkpoint`, merge, and save it to `out`.

    `settings` are RecoveryConfig fields (data, epochs, max_steps, max_minutes, lr, lora_r, ...).
    Periodic checkpoints go to `work_dir` (default: a hidden folder beside `out`); with
    `resume`, a run continues from its last one exactly as if never interrupted. `on_step(step,
    loss)` is called after every optimizer step.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from ..io.checkpoint import REPORT_FILE, check_output_folder, load_checkpoint_model, save_checkpoint
    from ..devices import resolve_device
    from ..plan.counting import count_parameters
    from ..io.models import is_lorap_checkpoint
    from ..provenance import environment

    config = config or RecoveryConfig(**settings)
    config.validate()
    source = Path(checkpoint).expanduser().resolve()
    if not source.is_dir() or not is_lorap_checkpoint(source):
        raise LorapError(f"{checkpoint} is not a lorap checkpoint folder (made by `lorap compress`)")
    out = check_output_folder(out, overwrite, protected=[source])
    work = WorkFolder(Path(work_dir).expanduser().resolve() if work_dir else default_work_dir(out))
    if work.path == out or out in work.path.parents or source in work.path.parents or work.path == source:
        raise LorapError(f"the work folder {work.path} must lie outside both the source and the output")
    device = resolve_device(config.device)
    data_source = resolve_data(config.data)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    info(f"recovery data: {data_source} (cutoff {config.cutoff} tokens)")
    data = prepare_data(tokenizer, data_source, config)
    schedule = Schedule(len(data.train), config.batch_size, config.grad_accum, config.epochs, config.max_steps,
                        config.warmup_steps, config.lr, config.seed)
    run = {
        "source": str(source),
        "source_weights": _weights_signature(source),
        "data": data_source,
        "settings": {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE_SETTINGS},
        "train_examples": len(data.train),
        "total_steps": schedule.total_steps,
    }
    resume_state = _check_resume(work, run, resume)
    info(f"{len(data.train)} training and {len(data.validation)} held-out examples ({data.description['format']}); "
         f"{schedule.total_steps} steps of {config.batch_size * config.grad_accum} examples "
         f"({schedule.steps_per_epoch} per epoch)")

    source_config = AutoConfig.from_pretrained(source)
    stored_dtype = getattr(source_config, "dtype", None) or getattr(source_config, "torch_dtype", None)
    if isinstance(stored_dtype, str):
        stored_dtype = getattr(torch, stored_dtype, None)
    model = load_checkpoint_model(source, dtype=torch.float32).to(device)
    parameters_before = count_parameters(model)
    model.config.use_cache = False
    peft_model = attach_lora(model, config)
    if resume_state is None:
        work.start(run)
    state, best, stopped_by = train(peft_model, data, config, schedule, work, pad_id, device, resume_state,
                                    progress, on_step)

    load_trainable_state(peft_model, best)  # the best checkpoint by validation loss
    peft_model.eval()
    adapter_staging = None
    if keep_adapter:
        adapter_staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.adapter-", dir=out.parent))
        peft_model.save_pretrained(adapter_staging)
    merged = peft_model.merge_and_unload()
    parameters_after = count_parameters(merged)
    if parameters_after != parameters_before:  # the promise of this module: never grows back
        raise LorapError(f"merging changed the parameter count ({parameters_before} -> {parameters_after})")
    merged.config.use_cache = True
    if isinstance(stored_dtype, torch.dtype) and stored_dtype != torch.float32:
        merged.to(stored_dtype)
    merged.to("cpu")

    recovery = {
        "source": str(source),
        "data": data.description,
        "settings": {**config.to_dict(), "data": data_source},
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                 "targets": "every nn.Linear in the decoder layers (dense projections and both factors)",
                 "target_modules": len(lora_target_names(merged)), "merged": True},
        "steps": state.step,
        "total_steps": schedule.total_steps,
        "epochs_done": round(state.step / schedule.steps_per_epoch, 4),
        "tokens_seen": state.tokens_seen,
        "stopped_by": stopped_by,
        "validation_loss_before": state.validation_history[0][1],
        "best_step": state.best_step,
        "best_validation_loss": state.best_loss,
        "train_seconds": round(state.elapsed_s, 1),
        "parameters": parameters_after,
    }
    previous = merged.config.lorap.get("recovery")
    merged.config.lorap = {**merged.config.lorap, "recovery": {**recovery, **({"previous": previous} if previous else {})}}
    report = {
        **recovery,
        "output": str(out),
        "history": {"train": state.train_history, "validation": state.validation_history},
        "total_seconds": round(time.perf_counter() - started, 1),
        **environment(str(device)),
    }
    extra = {RECOVERY_REPORT_FILE: report}
    if (source / REPORT_FILE).is_file():
        extra[REPORT_FILE] = json.loads((source / REPORT_FILE).read_text())
    try:
        save_checkpoint(merged, tokenizer, out, overwrite, extra)
        if adapter_staging is not None:
            os.rename(adapter_staging, out / ADAPTER_FOLDER)
    finally:
        if adapter_staging is not None and adapter_staging.exists():
            shutil.rmtree(adapter_staging, ignore_errors=True)
    if stopped_by == "schedule":
        work.remove()
    info(f"recovered checkpoint written to {out} ({parameters_after:,} parameters, as before)")
    return Recovered(merged, tokenizer, report)


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
    if saved != run:
        changed = sorted(k for k in set(run) | set(saved or {}) if (saved or {}).get(k) != run.get(k))
        if "settings" in changed:
            old, new = (saved or {}).get("settings", {}), run["settings"]
            changed += [f"settings.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise LorapError(
            f"cannot resume: the run in {work.path} was started differently ({', '.join(changed)} differ). "
            "Use the same source, data and settings (only --max-minutes and --save-every may change), "
            "or delete that folder to start over"
        )
    return "checkpoint"


def format_recovery(report: dict) -> str:
    """A short text summary of a recovery report (numbers as recorded, never recomputed)."""
    data = report["data"]
    minutes = report["train_seconds"] / 60
    lines = [
        f"recovered: {report['source']} -> {report['output']}",
        f"data: {data['source']} ({data['format']}; {data['train_examples']} train / "
        f"{data['validation_examples']} held-out examples, cutoff {data['cutoff']})",
        f"steps: {report['steps']} of {report['total_steps']} ({report['epochs_done']} epochs, "
        f"{report['tokens_seen']:,} tokens, stopped by {report['stopped_by']}), {minutes:.1f} min of training",
        f"validation loss: {report['validation_loss_before']:.4f} before -> "
        f"{report['best_validation_loss']:.4f} best (step {report['best_step']}, merged)",
        f"parameters: {report['parameters']:,} (unchanged)",
    ]
    return "\n".join(lines)
