"""README.md says what runs: its ``python`` blocks run as written, and its table of a demo run is what the demo prints.

A tour leaves some names to the reader (their model, their batch, their tensors); :func:`stand_ins` gives each a
tiny value of the kind the README means, and nothing else: every other line, imports included, is the README's own.
The blocks run in one namespace, in the README's order, in a temporary working directory (they write ``adapter/``,
``out/``); a traceback points at the README's own line.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from peftkern import demo
from tests._helpers import tiny_batch, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DEMO_HEADER = "| | peftkern | PEFT + bitsandbytes |"
NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:-\d+(?:[.,]\d+)*)?( (?:B|KiB|MiB|GiB)\b)?")  # 332,546 / 1.02-1.03 / 0.8 MiB


def numbers_masked(line: str) -> str:
    """``line`` with each number (a range, an amount of bytes in any unit) as N (N bytes)."""
    return NUMBER.sub(lambda m: "N bytes" if m.group(1) else "N", line)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first line, its source) of every ```python block in ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def stand_ins(directory: Path) -> dict:
    """The names the README leaves to its reader, tiny (a run of every block takes seconds):

    * ``name``: what ``from_pretrained`` loads, a folder holding a random 2-layer Llama (hidden 32, vocab 100);
    * ``ids``, ``mask``, ``labels``: a batch of 2 sequences of 8 tokens for it (labels = ids, causal LM);
      ``batch``: those as a dict; ``batches``: a list of two such dicts (calibration data); ``ds``: a training set
      of 8 examples (dicts of 1-D tensors, as a tokenized ``datasets.Dataset`` yields), one step per epoch;
    * ``x`` [3 sequences, 5 tokens, in 32], ``weight`` [out 48, in 32], ``bias`` [48], ``lora_A`` [r 4, 32],
      ``lora_B`` [48, 4] (PEFT's layouts), ``lora_A_stack`` [2 adapters, 4, 32], ``lora_B_stack`` [2, 48, 4],
      ``linear``: an ``nn.Linear(32, 48)``;
    * ``h`` [3, 5, D 32], ``w_down`` [M 8, 32], ``b_down`` [8], ``w_up`` [32, 8], ``b_up`` [32] (an adapter);
    * ``q`` [B 2, Hq 4, S 5, D 8], ``k``, ``v`` [2, Hkv 2, 5, 8], ``prefix_k``, ``prefix_v`` [2, P 3, 8] (shared),
      ``padding`` [2, 5] (True = padding: the second row's first two tokens, left padding).
    """
    model = tiny_llama()
    folder = directory / "tiny-llama"
    model.save_pretrained(folder)
    first, second, rows = tiny_batch(model, seed=1), tiny_batch(model, seed=2), tiny_batch(model, seed=3, batch=8)
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    ds = [{k: v[i] for k, v in rows.items()} for i in range(8)]
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, :2] = True
    return dict(name=str(folder), ids=first["input_ids"], mask=first["attention_mask"], labels=first["labels"],
                batch=first, batches=[first, second], ds=ds,
                x=randn(3, 5, 32), weight=randn(48, 32), bias=randn(48), lora_A=randn(4, 32), lora_B=randn(48, 4),
                lora_A_stack=randn(2, 4, 32), lora_B_stack=randn(2, 48, 4), linear=torch.nn.Linear(32, 48),
                h=randn(3, 5, 32), w_down=randn(8, 32), b_down=randn(8), w_up=randn(32, 8), b_up=randn(32),
                q=randn(2, 4, 5, 8), k=randn(2, 2, 5, 8), v=randn(2, 2, 5, 8), prefix_k=randn(2, 3, 8),
                prefix_v=randn(2, 3, 8), padding=padding)


def test_readme_has_python_blocks():
    """The test below runs something: the README's tour is a python block."""
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    assert any("pk.patch(" in source for _, source in blocks)


# the tour's TrainingArguments(gradient_checkpointing=True): the name every transformers >= 4.45 knows (5 warns)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block, in order, in one namespace: no name undefined, no call that raises."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme", **stand_ins(tmp_path)}
    for line, source in python_blocks(README.read_text()):
        code = compile("\n" * (line - 1) + source, str(README), "exec")  # tracebacks name README.md's lines
        exec(code, namespace)


def test_readme_demo_table_is_what_the_demo_prints(tmp_path):
    """The demo ends with the README's table of a run (``demo.summary_table``): the same rows, in the same order, each
    cell worded alike; only the numbers are a run's (a range in the README, where runs differed, is one number)."""
    lines = README.read_text().splitlines()
    start = lines.index(DEMO_HEADER)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    adapter = tmp_path / "adapter_model.safetensors"
    adapter.write_bytes(bytes(1_342_177))
    res = demo.DemoResult(acc_before=0.461, epoch_accuracies=[0.965, 0.93, 0.91], acc_after=0.91, trainable=332_546,
                          total=23_000_000, peft_trainable=332_546, weight_bytes={"nf4": 5_526_000, "fp32": 42_467_000},
                          same_codes_as_bnb=True, saved_bytes={"batch_shape": [16, 10], "ours_bytes": 28_835_000,
                                                               "lora_ours_bytes": 839_000, "peft_bytes": 43_725_000,
                                                               "lora_peft_bytes": 15_624_000},
                          step_time={"ratio": 1.02, "reps": 10}, adapter_path=str(adapter), reload_max_diff=0.0,
                          peft_reload_max_diff=0.09, peft_reload_agreement=1.0)
    printed = demo.summary_table(res)
    assert [numbers_masked(line) for line in printed] == [numbers_masked(line) for line in lines[start:end]]
