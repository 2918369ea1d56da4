"""The recovery loss: next-token loss, distillation from a teacher's logits (forward KL at a
temperature), and an optional match of the layers' outputs, mixed by weights.

Logits are never formed for a whole batch. The final hidden states of the predicted positions are
cut into chunks, and each chunk's logits (student and teacher), losses and gradient are computed
by itself: the chunk runs under activation checkpointing, so its logits are recomputed in the
backward pass instead of kept. Memory for the loss is bounded by LOGITS_BYTES_AT_ONCE whatever
the vocabulary (49k for SmolLM2, 152k for Qwen2.5, 128k for Llama 3).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import LorapError
from ..io.instructions import IGNORE_INDEX

LOGITS_BYTES_AT_ONCE = 16 * 2**20  # one float32 logits matrix of a chunk; a few live at once
MIN_CHUNK_TOKENS = 16


@dataclass
class Terms:
    """One batch's loss terms, each summed over its predicted tokens."""

    total: torch.Tensor  # the mixed loss, with its graph (divide by the step's tokens, then backward)
    nll: float
    kd: float
    hidden: float
    tokens: int


def causal_lm(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _capped(logits, config):
    """The family's own logit soft-capping (Gemma 2), where it has one."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


class Objective:
    """The loss of a recovery run for one student and an optional teacher."""

    def __init__(self, student, teacher=None, kd_weight: float = 1.0, temperature: float = 1.0, hidden_weight: float = 0.0):
        self.student, self.teacher = student, teacher
        self.kd_weight = kd_weight if teacher is not None else 0.0
        self.temperature = temperature
        self.hidden_weight = hidden_weight if teacher is not None else 0.0
        if self.hidden_weight > 0:
            layers = (causal_lm(student).config.num_hidden_layers, teacher.config.num_hidden_layers)
            if layers[0] != layers[1]:
                raise LorapError(f"--kd-hidden-weight matches layer outputs, so the teacher needs as many layers as the student "
                                 f"(it has {layers[1]}, the student {layers[0]})")

    def _chunk_tokens(self, vocab: int) -> int:
        return max(MIN_CHUNK_TOKENS, LOGITS_BYTES_AT_ONCE // (4 * vocab))

    def _chunk(self, student_hidden, teacher_hidden, targets):
        """Summed (mixed loss, next-token loss, distillation loss) of one chunk of positions."""
        lm = causal_lm(self.student)
        logits = _capped(lm.get_output_embeddings()(student_hidden).float(), lm.config)
        nll = F.cross_entropy(logits, targets, reduction="sum")
        if teacher_hidden is None:
            return nll, nll.detach(), torch.zeros((), device=nll.device)
        temperature = self.temperature
        with torch.no_grad():
            teacher_logits = _capped(self.teacher.get_output_embeddings()(teacher_hidden).float(), self.teacher.config)
            teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
        student_log_probs = F.log_softmax(logits / temperature, dim=-1)
        # forward KL(teacher || student), scaled by T^2 so its gradient keeps its size across temperatures
        kd = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum") * temperature**2
        total = (1 - self.kd_weight) * nll + self.kd_weight * kd
        return total, nll.detach(), kd.detach()

    def _hidden_states(self, model, input_ids, mask, with_layers: bool):
        out = causal_lm(model).get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False,
                                            output_hidden_states=with_layers)
        return out.last_hidden_state, (out.hidden_states if with_layers else None)

    def teacher_states(self, batch, device) -> tuple:
        """The teacher's (final hidden states, layer outputs or None) on a batch; (None, None) without one."""
        if self.teacher is None:
            return None, None
        input_ids, mask, _ = (t.to(device) for t in batch)
        with torch.no_grad():
            return self._hidden_states(self.teacher, input_ids, mask, self.hidden_weight > 0)

    def __call__(self, batch, device, teacher_states: tuple | None = None) -> Terms:
        """The batch's loss terms. `teacher_states` are the teacher's outputs on this very batch when
        already known (teacher_states()); otherwise the teacher runs."""
        input_ids, mask, labels = (t.to(device) for t in batch)
        with_layers = self.hidden_weight > 0
        hidden, layers = self._hidden_states(self.student, input_ids, mask, with_layers)
        teacher_hidden, teacher_layers = teacher_states or self.teacher_states(batch, device)
        targets = labels[:, 1:]
        predicted = targets != IGNORE_INDEX
        rows = hidden[:, :-1][predicted]
        teacher_rows = teacher_hidden[:, :-1][predicted] if teacher_hidden is not None else None
        flat_targets = targets[predicted]
        tokens = int(flat_targets.numel())
        total = hidden.new_zeros((), dtype=torch.float32)
        nll = kd = 0.0
        step = self._chunk_tokens(causal_lm(self.student).config.vocab_size)
        for start in range(0, tokens, step):
            piece = slice(start, start + step)
            part = checkpoint(self._chunk, rows[piece], None if teacher_rows is None else teacher_rows[piece],
                              flat_targets[piece], use_reentrant=False)
            total = total + part[0]
            nll += float(part[1])
            kd += float(part[2])
        hidden_loss = 0.0
        if with_layers:
            # each layer's output against the teacher's, relative to the teacher's size so that every
            # layer counts alike (the residual stream grows with depth); summed over predicted tokens
            valid = mask.bool()
            pairs = list(zip(layers[1:], teacher_layers[1:]))
            relative = sum(((s - t)[valid].pow(2).sum(-1) / t[valid].pow(2).sum(-1).clamp_min(1e-6)) for s, t in pairs)
            term = relative.sum() / len(pairs) * (tokens / max(1, int(valid.sum())))
            total = total + self.hidden_weight * term
            hidden_loss = float(term.detach())
        return Terms(total, nll, kd, hidden_loss, tokens)
