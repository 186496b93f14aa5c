"""Pieces the example scripts share: the model-shape options and a check recorder."""

from __future__ import annotations

import argparse


def model_parser(doc: str, *, head_dim: int = 128, M: int = 64, prompt_len: int = 300,
                 prompt_help: str = "longest prompt (the second is 37 tokens shorter)") -> argparse.ArgumentParser:
    """An argument parser with the attention shape, prompt and decode-step options every example takes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--M", type=int, default=M, help="PQ subspaces")
    p.add_argument("--prompt-len", type=int, default=prompt_len, help=prompt_help)
    p.add_argument("--steps", type=int, default=4, help="decode steps")
    p.add_argument("--seed", type=int, default=0)
    return p


class Checks:
    """Prints each check as it runs and remembers the failures (the script's exit status)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)
