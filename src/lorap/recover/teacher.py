"""The teacher of a distillation: which model it is, and the checks that it can teach this student
(same tokenizer and vocabulary), made before any training starts."""
import json
from pathlib import Path

from ..errors import LorapError
from ..log import info

BASE = "base"  # the model the checkpoint was compressed from, as its config.lorap names it


def teacher_spec(teacher: str, student_folder: Path) -> str | None:
    """The model spec to load: `base` becomes the checkpoint's base model (None = built-in default)."""
    if teacher != BASE:
        return teacher
    metadata = json.loads((Path(student_folder) / "config.json").read_text()).get("lorap") or {}
    return metadata.get("base_model")


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_config, student_config, described: str) -> None:
    """Distillation compares the two models' distributions token by token, so both must mean the
    same thing by every token id."""
    teacher_vocab, student_vocab = teacher_config.vocab_size, student_config.vocab_size
    if teacher_vocab != student_vocab:
        raise LorapError(
            f"the teacher {described} has a vocabulary of {teacher_vocab} tokens and the student {student_vocab}: "
            "distillation needs the same tokenizer. Use the model the checkpoint was compressed from (--teacher base)"
        )
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise LorapError(
            f"the teacher {described} tokenizes differently from the student (their vocabularies differ): "
            "distillation needs the same tokenizer. Use the model the checkpoint was compressed from (--teacher base)"
        )


def load_teacher(teacher: str, student_folder: Path, student_tokenizer, student_config, device):
    """The teacher model in eval mode with no gradients, on `device`, in float32."""
    import torch

    from ..io.models import load_model

    spec = teacher_spec(teacher, student_folder)
    model, tokenizer, source = load_model(spec, dtype=torch.float32, device=str(device))
    described = source.describe()
    check_same_vocabulary(tokenizer, student_tokenizer, model.config, student_config, described)
    model.requires_grad_(False)
    model.eval()
    model.config.use_cache = False
    info(f"teacher: {described}")
    return model, described
