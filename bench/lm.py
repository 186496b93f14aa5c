#!/usr/bin/env python
"""A small Llama trained here on real text: the model of the quality study (``bench/quality.py``).

No pretrained weights can be downloaded on the GPU machines, so this recipe makes one from text that ships
with every Python: **the standard library's own sources** (every ``*.py`` under
``sysconfig.get_paths()["stdlib"]``, site-packages excluded), as bytes. The split is by file: a file is
held out when ``zlib.crc32(its path relative to the stdlib) % 10 == 0`` (about a tenth of the bytes), so
no held-out file is ever seen in training or calibration. The results record the root, the file counts
and bytes of both splits and the held-out file names.

Model: ``transformers.LlamaForCausalLM``, byte-level (vocab 256 bytes + a document separator), 6 layers,
hidden 1024, 8 query heads over 2 kv heads (GQA 4), head_dim 128, RoPE, tied embeddings. Trained in bf16
autocast with AdamW from a fixed seed: first at 2K tokens of context, then at 8K, for ``--minutes`` of
wall time (the recorded step counts replay it with ``--steps``). A share of the training sequences carry a
passkey (a line ``# the pass key is 12345. remember it.`` at a random depth, asked for at the end:
``# what is the pass key? the pass key is 12345``), so the model learns to retrieve it and the study can
test retrieval at 2K and 8K (:func:`passkey_prompt`).

    python bench/lm.py --out /tmp/million_lm      # trains (about 5 minutes on an H200), saves weights + meta

The weights are not committed: the study re-creates the model with this recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np

SEP = 256             # document separator token (bytes are 0..255)
VOCAB = 258           # 256 bytes, SEP, one spare
HELD_OUT_MOD = 10     # crc32(relpath) % HELD_OUT_MOD == 0: held out
PASSKEY_SHARE = 0.3   # of the training sequences
NEEDLE = "\n# the pass key is {key}. remember it.\n"
QUESTION = "\n# what is the pass key? the pass key is "


def model_config(max_positions: int = 8192):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                       max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=SEP, eos_token_id=SEP, pad_token_id=SEP)


def corpus_files(root: str | Path | None = None) -> tuple[Path, list[Path], list[Path]]:
    """(stdlib root, training files, held-out files), each sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"]).resolve()
    files = sorted((p for p in root.rglob("*.py")
                    if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    held = [p for p in files if zlib.crc32(p.relative_to(root).as_posix().encode()) % HELD_OUT_MOD == 0]
    held_set = set(held)
    return root, [p for p in files if p not in held_set], held


def token_stream(files: list[Path]) -> np.ndarray:
    """The files' bytes as int32 tokens, each file followed by SEP."""
    parts = []
    for p in files:
        parts.append(np.frombuffer(p.read_bytes(), dtype=np.uint8).astype(np.int32))
        parts.append(np.array([SEP], dtype=np.int32))
    return np.concatenate(parts)


def corpus_record(root: Path, train: list[Path], held: list[Path]) -> dict:
    size = lambda fs: int(sum(p.stat().st_size for p in fs))  # noqa: E731
    return {"root": str(root), "rule": f"held out: zlib.crc32(relative path) % {HELD_OUT_MOD} == 0",
            "train_files": len(train), "train_bytes": size(train), "held_out_files": len(held),
            "held_out_bytes": size(held), "held_out_names": [p.relative_to(root).as_posix() for p in held]}


def encode_text(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(np.int32)


def passkey_prompt(stream: np.ndarray, rng: np.random.Generator, length: int, depth: float,
                   key: int | None = None) -> tuple[np.ndarray, str]:
    """``length`` tokens of filler from ``stream`` with the needle at ``depth`` (0..1) and the question last
    (the answer is not included). Returns (tokens, the 5-digit key)."""
    key = int(rng.integers(10000, 100000)) if key is None else key
    needle, question = encode_text(NEEDLE.format(key=key)), encode_text(QUESTION)
    filler = length - 1 - needle.size - question.size
    start = int(rng.integers(0, stream.size - filler))
    body = stream[start:start + filler]
    at = int(round(depth * filler))
    ids = np.concatenate([[SEP], body[:at], needle, body[at:], question]).astype(np.int32)
    return ids, str(key)


def training_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, T: int) -> np.ndarray:
    out = np.empty((batch, T), dtype=np.int64)
    for b in range(batch):
        if rng.random() < PASSKEY_SHARE:
            ids, key = passkey_prompt(stream, rng, T - 5, float(rng.random()))
            out[b] = np.concatenate([ids, encode_text(key)])
        else:
            start = int(rng.integers(0, stream.size - T))
            out[b] = stream[start:start + T]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/million_lm", help="folder for model.safetensors / config / meta.json")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-time budget of the training loop")
    p.add_argument("--steps", default=None, help="replay exact step counts 'short,long' instead of --minutes")
    p.add_argument("--long-share", type=float, default=0.4, help="share of the budget trained at 8K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1.5e-3)
    return p.parse_args(argv)


def train(args) -> dict:
    import harness

    harness.require_gpu("train-lm")
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    root, train_files, held = corpus_files()
    stream = token_stream(train_files)
    config = model_config()
    model = LlamaForCausalLM(config).cuda()
    model.config._attn_implementation = "sdpa"
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    phases = [(2048, 16), (8192, 4)]  # (context, batch): 32K tokens per step either way
    budget = args.minutes * 60.0
    fixed = [int(s) for s in args.steps.split(",")] if args.steps else None
    warmup = 100
    log, steps_done, t0 = [], [0, 0], time.perf_counter()
    for phase, (T, B) in enumerate(phases):
        share = (1 - args.long_share) if phase == 0 else args.long_share
        phase_end = (time.perf_counter() - t0) + budget * share
        step = 0
        while (step < fixed[phase]) if fixed else (time.perf_counter() - t0 < phase_end):
            done = (time.perf_counter() - t0) / budget if not fixed else \
                (steps_done[0] + step) / max(1, sum(fixed))
            total_step = steps_done[0] + step
            lr = args.lr * min(1.0, (total_step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))
            for g in opt.param_groups:
                g["lr"] = lr
            ids = torch.from_numpy(training_batch(stream, rng, B, T)).cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step % 100 == 0:
                val = float(loss)
                log.append({"step": total_step, "context": T, "loss": val, "seconds": time.perf_counter() - t0})
                print(f"step {total_step:5d}  T {T}  loss {val:.3f}  lr {lr:.2e}  {time.perf_counter() - t0:6.1f} s",
                      flush=True)
            step += 1
        steps_done[phase] = step
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    meta = {"params": params, "seconds": seconds, "steps": {"2048": steps_done[0], "8192": steps_done[1]},
            "tokens": steps_done[0] * 16 * 2048 + steps_done[1] * 4 * 8192, "seed": args.seed, "lr": args.lr,
            "replay": f"--steps {steps_done[0]},{steps_done[1]}", "log": log,
            "corpus": corpus_record(root, train_files, held)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"trained {params / 1e6:.1f}M parameters for {seconds:.0f} s ({meta['tokens'] / 1e6:.0f}M tokens), "
          f"saved to {out}")
    return meta


def load(path: str | Path, dtype=None):
    """The trained model (eval mode, on the GPU when there is one) and its meta."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype or torch.float16)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), json.loads((Path(path) / "meta.json").read_text())


def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
