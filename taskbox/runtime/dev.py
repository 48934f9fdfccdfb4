"""``python -m taskbox.runtime.dev`` (``make dev``): api, relay and consumer as local processes.

Their output is interleaved with a name prefix. Ctrl-C (or SIGTERM) stops all three
gracefully; if one of them exits on its own, the others are stopped too and the exit
code says so.
"""

from __future__ import annotations

import asyncio
import signal
import sys

PROCESSES = ("api", "relay", "consumer")
COLOURS = {"api": "\033[36m", "relay": "\033[35m", "consumer": "\033[33m"}
RESET = "\033[0m"


async def _pipe(name: str, stream: asyncio.StreamReader) -> None:
    tty = sys.stdout.isatty()
    prefix = f"{COLOURS[name]}{name:<8}|{RESET} " if tty else f"{name:<8}| "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def main() -> int:
    children = {
        name: await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"taskbox.{name}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches them through us, once
        )
        for name in PROCESSES
    }
    pipes = [asyncio.create_task(_pipe(n, p.stdout)) for n, p in children.items() if p.stdout]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exits = {asyncio.create_task(p.wait()): n for n, p in children.items()}
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *exits], return_when=asyncio.FIRST_COMPLETED)
    crashed = [exits[t] for t in done if t in exits]
    for proc in children.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*(p.wait() for p in children.values()))
    await asyncio.gather(*pipes)
    stopper.cancel()
    if crashed:
        print(f"{', '.join(crashed)} exited on its own; stopped the others", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
