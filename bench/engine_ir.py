"""Instructions the engine process spends per Reserve, standalone, one tree against another.

    .venv/bin/python bench/engine_ir.py --tree base=/tmp/base/src      # this tree vs another
    .venv/bin/python bench/engine_ir.py --lines 1,3 --orders 200,1200

Runs `Engine.reserve` for N orders (16 in flight, uvloop) in a Python process under
valgrind's callgrind, twice with different N, against a private redis-server (a free
127.0.0.1 port, not under valgrind), and prints (Ir(N2) - Ir(N1)) / (N2 - N1): the
instructions per order without start-up. callgrind counts instructions, so the figure does
not depend on the machine's load. A tree is a `src` directory given on PYTHONPATH (another
checkout with its extensions built in place: `setup.py build_ext --inplace`); "current" is
this one. Needs `valgrind`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
SKUS = 300

DRIVE = """
import asyncio, inspect, sys
import uvloop
from stockhold.engine import Engine
from stockhold.settings import Settings

async def main(url, n, lines, tag):
    e = Engine.connect(url, Settings(redis_url=url, partitions=64))
    r = e.resolver
    orders = [
        r.resolve_order(
            f"{tag}-{i}",
            [(f"sku{(i * 7 + j * 13) % SKUS}", "", "", "east", 1) for j in range(lines)],
            0,
            172800,
        )
        for i in range(n)
    ]
    sem = asyncio.Semaphore(16)

    async def one(o):
        async with sem:
            await e.reserve(o, **ACTOR)

    await asyncio.gather(*(one(o) for o in orders))
    await e.close()

SKUS = int(sys.argv[5])
# trees from before events carried an actor (issue 12) take none
ACTOR = {"actor": "bench"} if "actor" in inspect.signature(Engine.reserve).parameters else {}
uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""

STOCK = """
import asyncio, inspect, sys
from stockhold.engine import Engine
from stockhold.settings import Settings

async def main(url, skus):
    e = Engine.connect(url, Settings(redis_url=url, partitions=64))
    for i in range(skus):
        unit = e.resolver.unit(f"sku{i}", "", "")
        await e.adjust(f"a{i}", unit, "east", 10**8, "", **ACTOR)
    await e.close()

ACTOR = {"actor": "bench"} if "actor" in inspect.signature(Engine.adjust).parameters else {}
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def collected(log: str) -> int:
    m = re.search(r"Collected : (\d+)", log)
    if not m:
        raise RuntimeError(f"no callgrind total in:\n{log[-2000:]}")
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", action="append", default=[], help="NAME=SRC_DIR (repeatable)")
    p.add_argument("--lines", default="1,3", help="lines per order, comma-separated")
    p.add_argument("--orders", default="200,1200", help="the two order counts N1,N2")
    a = p.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH", file=sys.stderr)
        return 2
    trees = [("current", str(SRC))] + [tuple(t.split("=", 1)) for t in a.tree]  # type: ignore[misc]
    n1, n2 = (int(x) for x in a.orders.split(","))
    work = Path(tempfile.mkdtemp(prefix="engine-ir-"))
    results: dict[tuple[str, int], float] = {}
    try:
        for name, src in trees:
            env = {**os.environ, "PYTHONPATH": src}
            port = free_port()
            redis = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(work),
                ],
                stdout=subprocess.DEVNULL,
            )
            try:
                url = f"redis://127.0.0.1:{port}/0"
                for _ in range(50):
                    with socket.socket() as s:
                        if s.connect_ex(("127.0.0.1", port)) == 0:
                            break
                    asyncio.run(asyncio.sleep(0.1))
                subprocess.run([sys.executable, "-c", STOCK, url, str(SKUS)], env=env, check=True)
                for lines in (int(x) for x in a.lines.split(",")):
                    ir = []
                    for n in (n1, n2):
                        out = subprocess.run(
                            [
                                "valgrind",
                                "--tool=callgrind",
                                f"--callgrind-out-file={work}/cg.out",
                                sys.executable,
                                "-c",
                                DRIVE,
                                url,
                                str(n),
                                str(lines),
                                f"{name}-{lines}-{n}",
                                str(SKUS),
                            ],
                            env=env,
                            capture_output=True,
                            text=True,
                            check=True,
                        )
                        ir.append(collected(out.stderr))
                    results[(name, lines)] = (ir[1] - ir[0]) / (n2 - n1)
                    print(
                        f"{name:10} {lines} line(s): {results[(name, lines)] / 1000:8.1f} kIr/order"
                    )
            finally:
                redis.terminate()
                redis.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(trees) > 1:
        for name, _ in trees[1:]:
            for (tree, lines), ir in results.items():
                if tree == name:
                    print(
                        f"{name} / current, {lines} line(s): {ir / results[('current', lines)]:.3f}"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
