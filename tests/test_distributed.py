"""``torchrun`` over ``camixer-fast upscale``: two CPU processes on gloo write, between them,
exactly the files one process writes, each file once, and a corrupt input on one rank is
reported while every other file is written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camixer_fast.cli import main
from camixer_fast.train import distributed

REPO = Path(__file__).resolve().parents[1]

REPLACE_LOGGER = '''
import os
_real_replace = os.replace


def _logged_replace(src, dst, *args, **kwargs):
    _real_replace(src, dst, *args, **kwargs)
    with open(os.environ["CAMIXER_TEST_REPLACE_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\t{os.fspath(dst)}\\n")


os.replace = _logged_replace
'''
"""A sitecustomize for the child processes: every os.replace (how outputs land) is logged."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_takes_every_world_th_item():
    items = list(range(7))
    parts = [distributed.shard(items, distributed.Rank(r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert distributed.rank_from_env() == distributed.Rank()


def test_two_gloo_processes_write_what_one_process_writes(tmp_path, one_thread):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for k, (h, w) in enumerate([(8, 10), (8, 10), (11, 7), (6, 13), (9, 9)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    (folder / "2b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REPLACE_LOGGER)
    log = tmp_path / "replaced.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{hook}{os.pathsep}{REPO}",
               CAMIXER_TEST_REPLACE_LOG=str(log))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    many = tmp_path / "two_processes"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         "-m", "camixer_fast", "upscale", str(folder), "-o", str(many)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    print(proc.stderr[-3000:])
    assert "2b_corrupt.png: cannot read image" in proc.stderr
    assert "5 written, 0 skipped, 1 failed" in proc.stderr
    assert proc.stderr.count("written, 0 skipped") == 1, "only rank 0 prints the summary"
    assert proc.returncode != 0

    torch.set_num_threads(1)
    one = tmp_path / "one_process"
    assert main(["upscale", str(folder), "-o", str(one)]) == 1
    expected = sorted(p.name for p in one.iterdir())
    assert expected == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert sorted(p.name for p in many.iterdir()) == expected
    for name in expected:
        assert (many / name).read_bytes() == (one / name).read_bytes(), name

    records = [line.split("\t") for line in log.read_text().splitlines()]
    targets = [Path(dst).name for _, dst in records]
    assert sorted(targets) == expected, "a file was written twice, or not at all"
    assert len({pid for pid, _ in records}) == 2, "both processes wrote their share"


@pytest.mark.parametrize("device,expected", [(None, None), ("cpu", "cpu")])
def test_device_of_a_rank_on_a_cpu_machine(device, expected):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine gives cuda:LOCAL_RANK")
    assert distributed.device_for(distributed.Rank(1, 2, 1, 2), device) == expected
