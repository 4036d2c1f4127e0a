"""Plain-torch supervised fine-tuning for the toy world: AdamW, teacher forcing, loss on answers only.

    sft(model, tokenizer, sampler, steps=600, batch_size=64, lr=1e-3)

A training row is <bos> prompt answer <eos>, right-padded (positions start at 0 in every row, as with
left padding plus an attention mask at generation time). The loss is the mean cross-entropy over the
answer tokens and the <eos> that ends them; prompt tokens and padding carry no loss.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch


def encode_batch(tokenizer, examples: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """examples: (prompt, answer, domain). Returns input_ids [B, L], attention_mask [B, L],
    labels [B, L] (-100 except on answer tokens and the final <eos>)."""
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


def sft(model, tokenizer, sampler: Iterator[tuple[str, str, str]], steps: int, batch_size: int,
        lr: float, warmup: int = 20, weight_decay: float = 0.0, log_every: int = 0) -> list[float]:
    """Train `model` in place for `steps` AdamW steps (linear warmup, cosine decay to lr/10).
    Returns the loss of every step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    losses = []
    for step in range(steps):
        ids, mask, labels = encode_batch(tokenizer, [next(sampler) for _ in range(batch_size)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = answer_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  sft step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    model.eval()
    return losses
