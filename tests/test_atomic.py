"""Crash-safe directory writes (`mllm.atomic`): real SIGKILLs at random moments never leave the target missing or
half-written, what is swapped in was fsynced first, and a directory left aside by a kill is put back."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mllm import atomic

REPO = Path(__file__).resolve().parents[1]
PARTS, PART_SIZE = 16, 256 * 1024  # 4 MiB a generation: long enough to be killed in the middle of

# Writes generation after generation of TARGET in a loop, printing each one it has swapped in. MODE `exchange`
# is the default swap; `two-step` the fallback (old aside, new in) of filesystems without RENAME_EXCHANGE;
# `die-between-renames` the fallback killed (SIGKILL, by itself) right after moving the old one aside.
WRITER = f"""
import os, signal, sys
from pathlib import Path
from mllm import atomic

target, mode, generation = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if mode != "exchange":
    atomic._exchange = lambda a, b: False
if mode == "die-between-renames":
    rename = os.replace
    def replace(src, dst):
        rename(src, dst)
        if Path(dst).name == f".{{target.name}}.old":
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.replace = replace
while True:
    generation += 1
    with atomic.atomic_directory(target) as tmp:
        for k in range({PARTS}):
            (tmp / f"part-{{k}}.dat").write_bytes(generation.to_bytes(4, "little") * ({PART_SIZE} // 4))
        (tmp / "generation").write_text(str(generation))
    print(generation, flush=True)
"""


def write_generation(target: Path, generation: int) -> None:
    with atomic.atomic_directory(target) as tmp:
        for k in range(PARTS):
            (tmp / f"part-{k}.dat").write_bytes(generation.to_bytes(4, "little") * (PART_SIZE // 4))
        (tmp / "generation").write_text(str(generation))


def complete_generation(target: Path) -> int:
    """The generation `target` holds, checked to be whole: every part there, full length, of that generation."""
    assert target.is_dir(), f"{target} is missing"
    generation = int((target / "generation").read_text())
    assert sorted(p.name for p in target.iterdir()) == sorted(["generation", *(f"part-{k}.dat" for k in range(PARTS))])
    for k in range(PARTS):
        assert (target / f"part-{k}.dat").read_bytes() == generation.to_bytes(4, "little") * (PART_SIZE // 4)
    return generation


def start_writer(target: Path, mode: str, generation: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), mode, str(generation)], stdout=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.parametrize("mode, kills", [("exchange", 20), ("two-step", 8)])
def test_sigkill_at_random_moments_leaves_a_complete_directory(tmp_path, mode, kills):
    if mode == "exchange" and not _can_exchange(tmp_path):
        pytest.skip("this filesystem cannot exchange two directories (renameat2 RENAME_EXCHANGE)")
    target = tmp_path / "checkpoint"
    write_generation(target, 0)
    rng, generation, seen = random.Random(0), 0, {0}
    for _ in range(kills):
        writer = start_writer(target, mode, generation)
        for _ in range(rng.randint(0, 2)):  # let it swap in a few whole generations first
            assert writer.stdout.readline(), "the writer died on its own"
        time.sleep(rng.uniform(0, 0.03))  # a generation takes ~15 ms here: writing, fsyncing or swapping one
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        if mode == "two-step":
            atomic.recover(target)  # a kill between the two renames left the old one as .checkpoint.old
        generation = complete_generation(target)  # the exchange needs no recovery: the target is never missing
        seen.add(generation)
    assert len(seen) > 1, "no kill came after a completed swap"
    write_generation(target, generation + 1)  # the next write clears what the killed ones left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_reader_and_writer(tmp_path):
    from mllm.checkpoint import read_config
    from mllm.config import CONFIG_FILE, MLLMConfig

    target = tmp_path / "checkpoint"
    write_generation(target, 0)
    writer = start_writer(target, "die-between-renames", 0)
    assert writer.wait() == -signal.SIGKILL
    writer.stdout.close()
    assert not target.exists() and complete_generation(tmp_path / ".checkpoint.old") == 0  # the worst moment
    atomic.recover(target)
    assert complete_generation(target) == 0 and not (tmp_path / ".checkpoint.old").exists()

    os.replace(target, tmp_path / ".checkpoint.old")  # the same state again: the next write puts it back first
    with atomic.atomic_directory(target, may_replace=lambda d: (d / "generation").is_file()) as tmp:
        (tmp / "generation").write_text("1")
    assert (target / "generation").read_text() == "1" and not (tmp_path / ".checkpoint.old").exists()

    ckpt = tmp_path / "ckpt"  # and a reader of checkpoints puts it back
    with atomic.atomic_directory(ckpt) as tmp:
        MLLMConfig().save(tmp / CONFIG_FILE)
    os.replace(ckpt, tmp_path / ".ckpt.old")
    assert read_config(ckpt) == MLLMConfig() and (ckpt / CONFIG_FILE).is_file()


@pytest.mark.parametrize("exchange_works", [True, False], ids=["exchange", "two-step"])
def test_everything_is_fsynced_before_it_is_swapped_in(tmp_path, monkeypatch, exchange_works):
    if exchange_works and not _can_exchange(tmp_path):
        pytest.skip("this filesystem cannot exchange two directories (renameat2 RENAME_EXCHANGE)")
    target = tmp_path / "out"
    write_generation(target, 0)
    synced, published = [], []  # inodes fsynced; those fsynced by the time the new directory was published
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, atomic._exchange

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src, dst):
        if Path(dst) == target:
            published.append(set(synced))
        real_replace(src, dst)

    def exchange(a, b):
        published.append(set(synced))
        return real_exchange(a, b) if exchange_works else False

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic, "_exchange", exchange)
    with atomic.atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.dat").write_bytes(b"w" * 1000)
        (tmp / "config.json").write_text("{}")
    new = {p.stat().st_ino for p in (target / "sub" / "weights.dat", target / "config.json", target / "sub", target)}
    assert all(new <= before for before in published)  # every file and folder on disk before it is published
    assert len(published) == (1 if exchange_works else 2)  # tried the exchange; then the second rename
    assert synced[-1] == tmp_path.stat().st_ino  # and the parent last, so the swap itself is durable


def test_durable_file_writes(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    path = tmp_path / "metrics.jsonl"
    atomic.write_text_durably(path, "a\n")
    assert path.read_text() == "a\n" and path.stat().st_ino in synced and tmp_path.stat().st_ino in synced
    with path.open("a") as f:
        atomic.append_durably(f, "b\n")
    assert path.read_text() == "a\nb\n" and synced[-1] == path.stat().st_ino
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def _can_exchange(folder: Path) -> bool:
    (folder / ".probe-a").mkdir()
    (folder / ".probe-b").mkdir()
    try:
        return atomic._exchange(folder / ".probe-a", folder / ".probe-b")
    finally:
        (folder / ".probe-a").rmdir()
        (folder / ".probe-b").rmdir()
