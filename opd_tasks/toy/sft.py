"""Plain-torch supervised fine-tuning for the toy world: AdamW, teacher forcing, loss on answers only.

    trainer = SFT(model, tokenizer, lr=2e-3)
    losses = trainer.train(sampler.batch(64, {"add": 1.0}) for _ in range(100))   # 100 steps
    trainer.train(...)                                                             # continue

A training row is <bos> prompt answer <eos>, right-padded (positions start at 0 in every row, as with
left padding plus an attention mask at generation time). The loss is the mean cross-entropy over the
answer tokens and the <eos> that ends them; prompt tokens and padding carry no loss. The learning rate
warms up linearly, then stays constant: the builder trains in chunks of unknown number.
"""
from __future__ import annotations

from typing import Iterable

import torch

Example = tuple[str, str, str]  # (prompt, answer, domain)


def encode_batch(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns input_ids [B, L], attention_mask [B, L], labels [B, L] (-100 except on answer tokens
    and the final <eos>)."""
    rows, labels = [], []
    for prompt, answer, _ in examples:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, mask, lab


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V], labels [B, L] (-100 = no loss). Mean NLL of labels[:, i] from logits[:, i-1]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


class SFT:
    """One model, one AdamW optimizer, trained over as many `train` calls as needed."""

    def __init__(self, model, tokenizer, lr: float, warmup: int = 20, grad_clip: float = 1.0):
        self.model, self.tokenizer, self.lr, self.warmup, self.grad_clip = model, tokenizer, lr, warmup, grad_clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        self.steps = 0

    def train(self, batches: Iterable[list[Example]]) -> list[float]:
        """One optimizer step per batch; returns each step's loss. Leaves the model in eval mode."""
        self.model.train()
        losses = []
        for examples in batches:
            ids, mask, labels = encode_batch(self.tokenizer, examples)
            for group in self.opt.param_groups:
                group["lr"] = self.lr * min(1.0, (self.steps + 1) / self.warmup)
            loss = answer_loss(self.model(input_ids=ids, attention_mask=mask).logits, labels)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
            self.steps += 1
            losses.append(loss.item())
        self.model.eval()
        return losses
