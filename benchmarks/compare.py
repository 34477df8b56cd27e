"""Decode speed of this checkout against another one, interleaved in one run.

Usage::

    git worktree add --detach /tmp/before <commit>
    python benchmarks/compare.py /tmp/before            # about a minute
    python benchmarks/compare.py /tmp/before --rounds 40

Why: ``benchmarks/decode.py`` compares our decoder with a baseline inside one run, but
comparing two commits means two runs, and on a shared machine the load moves between
them by more than a refactor could. Here two worker processes, one per checkout, decode
the same frames (built by this checkout, so both see identical bytes) in short turns,
one worker at a time, alternating which goes first. Each round gives one ratio
(this checkout / the other) from two measurements a fraction of a second apart; the
median over the rounds, with its spread, is the figure to read.

Cases: ``decode_frame`` of 10-record frames of codecs 8, 8E and 16 (envelope, CRC,
records), and decode plus the stream entry (``teltonika.contract.entry_fields``) for 8E,
the path every published record takes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
CASES = ("decode 8", "decode 8E", "decode 16", "decode+entry 8E")
RECORDS = 10
IMEI = "356307042441013"


def worker(repo: str) -> None:
    """Import *repo*'s package, read frames from the parent, time the cases it asks."""
    sys.path.insert(0, repo)
    from teltonika import contract
    from teltonika.codecs import load_codecs

    decode = load_codecs().decode_frame
    entry_fields = contract.entry_fields
    frames = {name: bytes.fromhex(sys.stdin.readline()) for name in ("8", "8E", "16")}

    def decoding(frame: bytes) -> Callable[[], Any]:
        return lambda: decode(frame)

    def with_entries(frame: bytes, codec: str) -> Callable[[], None]:
        def run() -> None:
            for record in decode(frame)[1].records:
                entry_fields(IMEI, codec, record, 1, "bench")

        return run

    work = {
        "decode 8": decoding(frames["8"]),
        "decode 8E": decoding(frames["8E"]),
        "decode 16": decoding(frames["16"]),
        "decode+entry 8E": with_entries(frames["8E"], "8E"),
    }
    for function in work.values():  # warm up, and fail early on a broken checkout
        function()
    print("ready", flush=True)
    for line in sys.stdin:
        case, seconds = line.rsplit(" ", 1)
        function = work[case]
        calls = 0
        deadline = time.perf_counter() + float(seconds)
        start = time.perf_counter()
        while True:
            for _ in range(50):
                function()
            calls += 50
            now = time.perf_counter()
            if now >= deadline:
                break
        print(calls * RECORDS / (now - start), flush=True)


def frames_hex() -> list[str]:
    sys.path.insert(0, str(HERE))
    from benchmarks.decode import make_frame
    from teltonika.wire import CODEC_8, CODEC_8E, CODEC_16

    return [make_frame(codec, RECORDS).hex() for codec in (CODEC_8, CODEC_8E, CODEC_16)]


class Worker:
    def __init__(self, repo: Path, frames: list[str]) -> None:
        self.repo = repo
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(repo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=repo,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        self.stdin.write("".join(f + "\n" for f in frames))
        self.stdin.flush()
        if self.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker for {repo} did not start")

    def measure(self, case: str, seconds: float) -> float:
        self.stdin.write(f"{case} {seconds}\n")
        self.stdin.flush()
        return float(self.stdout.readline())

    def close(self) -> None:
        self.stdin.close()
        self.process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per case (default 20)")
    parser.add_argument("--turn", type=float, default=0.3, help="seconds per turn (default 0.3)")
    args = parser.parse_args()
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"this checkout: {HERE}\nthe other:     {args.other.resolve()}")
    print(
        f"Python {sys.version.split()[0]}, {args.rounds} rounds of {args.turn:g} s, load {load}\n"
    )
    frames = frames_hex()
    ours, theirs = Worker(HERE, frames), Worker(args.other.resolve(), frames)
    try:
        print(f"{'case':<16} | {'other rec/s':>11} | {'this rec/s':>11} | ratio (median, IQR)")
        for case in CASES:
            mine: list[float] = []
            other: list[float] = []
            for n in range(args.rounds):
                pair = (ours, theirs) if n % 2 == 0 else (theirs, ours)
                for side in pair:
                    (mine if side is ours else other).append(side.measure(case, args.turn))
            ratios = sorted(a / b for a, b in zip(mine, other, strict=True))
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            rates = f"{statistics.median(other):>11,.0f} | {statistics.median(mine):>11,.0f}"
            print(f"{case:<16} | {rates} | {med:.3f}x ({q1:.3f}-{q3:.3f})")
    finally:
        ours.close()
        theirs.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
