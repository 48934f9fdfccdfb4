"""A three-node RabbitMQ cluster on loopback, owned by one test session.

Each node is a ``rabbitmq-server`` of the machine's installation with everything of its
own: node name (``tbx<pid><n>@localhost``), AMQP and distribution ports, data, log,
config and enabled-plugins files under one temporary directory, and an Erlang cookie in
a HOME of its own. The machine's default node (``rabbit@localhost`` on 5672, its data in
/var/lib/rabbitmq) is never addressed: every CLI call names its node with ``-n``, runs
with the cluster's HOME (so its cookie) and never goes through the packaged wrapper
(which, run as root, switches to the rabbitmq user and so to that user's cookie and
environment). epmd (4369) is shared, as on any host with several nodes; it is never
killed.

Why the scripts under /usr/lib/rabbitmq/bin and not /usr/sbin: the /usr/sbin names are a
wrapper that ``su``s to the rabbitmq user when run by root, dropping this environment.

Stopping is always possible: ``close()`` stops each node, then SIGKILLs whatever beam
process still runs with this cluster's directory on its command line (its own nodes
only: the directory is unique to it), then deletes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from tests.integration.processes import free_port

# pause_minority by default (see _CONFIG); another value (ignore, autoheal) to see how
# the suite fares with it: the partition test expects the cut-off node to pause.
PARTITION_HANDLING = os.environ.get("TEST_RABBIT_PARTITION_HANDLING", "pause_minority")
# The scripts themselves, not the /usr/sbin wrapper (module docstring).
RABBIT_BIN = Path(os.environ.get("TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))


# A node name of this harness: tbx<pid of the session that started it><letter>@localhost
_NODE_NAME = re.compile(r"tbx(\d+)[a-z]@localhost")


def rabbitmq_installed() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and (RABBIT_BIN / "rabbitmqctl").exists()


# pause_minority, so a node cut off from the others stops serving clients
# (they move to the majority) instead of running a second, diverging cluster.
_CONFIG = """\
listeners.tcp.1 = 127.0.0.1:{amqp_port}
loopback_users = none
cluster_partition_handling = {partition_handling}
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.2
log.console = false
log.file.level = info
"""


@dataclass
class RabbitNode:
    name: str  # tbx1234a@localhost
    amqp_port: int
    dist_port: int
    base: Path  # this node's own directory
    home: Path  # shared by the cluster: its .erlang.cookie
    proc: subprocess.Popen[bytes] | None = None
    log_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_file = self.base / "server.out"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"
        }
        env.update(
            {
                "HOME": str(self.home),
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
                # Not /etc/rabbitmq/rabbitmq-env.conf: it names the default node.
                "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                # Distribution on loopback only, and a short tick so a frozen or cut-off
                # peer is noticed in seconds rather than a minute.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1} -kernel net_ticktime 8"
                ),
                "RABBITMQ_CTL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def prepare(self) -> None:
        self.base.mkdir(parents=True)
        (self.base / "rabbitmq.conf").write_text(
            _CONFIG.format(amqp_port=self.amqp_port, partition_handling=PARTITION_HANDLING)
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text(
            "# this node's settings are in its environment\n"
        )


class RabbitCluster:
    """Three nodes (``size``) joined into one cluster; see the module docstring."""

    def __init__(self, size: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="taskbox-rabbit-"))
        self.home = self.root / "home"
        tag = f"tbx{os.getpid()}"
        self.nodes = [
            RabbitNode(
                name=f"{tag}{chr(ord('a') + i)}@localhost",
                amqp_port=free_port(),
                dist_port=free_port(),
                base=self.root / f"node{i + 1}",
                home=self.home,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """AMQP_URL naming every node, as Taskbox's processes take it."""
        return ",".join(self.urls)

    def node(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.name == name)

    # -- commands ------------------------------------------------------------------

    async def ctl(
        self, node: RabbitNode, *args: str, tool: str = "rabbitmqctl", timeout: float = 60.0
    ) -> str:
        """``tool -n node args``; its output, or AssertionError with it."""
        proc = await asyncio.create_subprocess_exec(
            str(RABBIT_BIN / tool),
            "-n",
            node.name,
            *args,
            env=node.env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"{tool} -n {node.name} {' '.join(args)}: timed out") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise AssertionError(f"{tool} -n {node.name} {' '.join(args)}: {text}")
        return text

    async def eval(self, node: RabbitNode, expression: str, timeout: float = 30.0) -> str:
        return (await self.ctl(node, "eval", expression, timeout=timeout)).strip()

    # -- lifecycle -----------------------------------------------------------------

    def _spawn(self, node: RabbitNode) -> None:
        out = node.log_file.open("ab")
        node.proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=node.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in pytest's process group: no stray signals
        )
        out.close()

    async def wait_booted(self, node: RabbitNode, within: float = 90.0) -> None:
        deadline = time.monotonic() + within
        last = ""
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise AssertionError(
                    f"{node.name} exited {node.proc.returncode}:\n{self.tail(node)}"
                )
            try:
                await self.ctl(node, "await_startup", "--timeout", "5", timeout=15)
                return
            except AssertionError as exc:
                last = str(exc)
            await asyncio.sleep(0.5)
        raise AssertionError(f"{node.name} did not boot in {within}s: {last}\n{self.tail(node)}")

    def tail(self, node: RabbitNode, lines: int = 40) -> str:
        texts = []
        for path in [node.log_file, *sorted((node.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                texts.append(f"--- {path}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(texts)

    async def start(self) -> RabbitCluster:
        self.sweep_orphans()
        self.home.mkdir(parents=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        for node in self.nodes:
            node.prepare()
            self._spawn(node)
        await asyncio.gather(*(self.wait_booted(node) for node in self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            await self.ctl(node, "stop_app")
            await self.ctl(node, "join_cluster", first.name)
            await self.ctl(node, "start_app")
        await self.wait_clustered()
        return self

    async def running_nodes(self, via: RabbitNode) -> set[str]:
        text = await self.eval(via, "rabbit_nodes:all_running().")
        return {n.name for n in self.nodes if n.name in text}

    async def wait_clustered(self, within: float = 90.0) -> None:
        """Every node runs and sees the others running."""
        deadline = time.monotonic() + within
        want = {n.name for n in self.nodes}
        seen: set[str] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):
                views = [await self.running_nodes(n) for n in self.nodes]
                if all(view == want for view in views):
                    return
                seen = views[0]
            await asyncio.sleep(0.5)
        raise AssertionError(f"cluster not whole in {within}s: {seen} of {want}")

    async def leader(self, queue: str) -> RabbitNode:
        """The node that leads quorum queue ``queue`` now (asked of any running node)."""
        last: Exception | None = None
        for via in self.nodes:
            try:
                text = await self.ctl(
                    via, "list_queues", "name", "leader", "--quiet", "--no-table-headers"
                )
            except AssertionError as exc:
                last = exc
                continue
            for line in text.splitlines():
                fields = line.split()
                if len(fields) == 2 and fields[0] == queue:
                    return self.node(fields[1])
            raise AssertionError(f"no leader listed for {queue!r}:\n{text}")
        raise AssertionError(f"no node answered list_queues: {last}")

    async def beam_pid(self, node: RabbitNode) -> int:
        return int((await self.eval(node, "os:getpid().")).strip('"'))

    async def kill(self, node: RabbitNode) -> None:
        """SIGKILL the node's Erlang VM: a crash, nothing flushed, no goodbye to peers."""
        pid = await self.beam_pid(node)
        os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(node.proc.wait, 30)

    async def restart(self, node: RabbitNode) -> None:
        """Start a node that was killed or stopped; returns once it is back in the cluster."""
        self._spawn(node)
        await self.wait_booted(node)
        await self.wait_clustered()

    async def stop(self, node: RabbitNode) -> None:
        """A clean stop of the node's VM (a rolling upgrade's first half)."""
        await self.ctl(node, "stop", timeout=90)
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(node.proc.wait, 30)

    async def partition(self, node: RabbitNode) -> None:
        """Cut ``node``'s distribution links to the other nodes, leaving its client
        port open: a partition, made without iptables (the test machine has none).

        The node is told a wrong cookie for each peer and disconnected from them, so
        every handshake between them fails from either side (each side checks the
        cookie it holds for the other), while the CLI, another node name, still gets
        in. With pause_minority the cut-off node then stops serving by itself."""
        peers = ", ".join(f"'{n.name}'" for n in self.nodes if n is not node)
        await self.eval(
            node,
            f"[erlang:set_cookie(N, tbx_partitioned) || N <- [{peers}]], "
            f"[erlang:disconnect_node(N) || N <- [{peers}]], ok.",
        )

    async def heal(self, node: RabbitNode) -> None:
        """Undo ``partition``: the right cookie for every peer again; the nodes find
        each other (a paused node pings its peers) and the cluster becomes whole."""
        peers = ", ".join(f"'{n.name}'" for n in self.nodes if n is not node)
        await self.eval(
            node,
            f"[erlang:set_cookie(N, erlang:get_cookie()) || N <- [{peers}]], "
            f"[net_adm:ping(N) || N <- [{peers}]], ok.",
        )
        await self.wait_clustered()

    async def accepts(self, node: RabbitNode) -> bool:
        try:
            async with asyncio.timeout(5):
                connection = await aio_pika.connect(node.url)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError):
            return False
        await connection.close()
        return True

    @staticmethod
    def sweep_orphans() -> list[int]:
        """Kill the nodes of an earlier session whose pytest died without its finalizers
        (SIGKILL): beam processes whose node is named ``tbx<pid>..`` after a process that
        no longer exists, with a taskbox-rabbit- directory; their directories go too.
        Nothing else is touched: not the default node, not a live session's nodes."""
        killed = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if "beam" not in args[0]:
                    continue
                owner = next(
                    (int(m.group(1)) for a in args if (m := _NODE_NAME.fullmatch(a))), None
                )
                root = next((a for a in args if "/taskbox-rabbit-" in a), None)
                if owner is None or root is None or Path(f"/proc/{owner}").exists():
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
                base = root[: root.index("/taskbox-rabbit-")]
                name = root[len(base) + 1 :].split("/", 1)[0]
                shutil.rmtree(Path(base) / name, ignore_errors=True)
        return killed

    def _own_beams(self) -> list[int]:
        """Pids of beam processes started with this cluster's directory: ours alone."""
        marker = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"beam" in cmdline.split(b"\0", 1)[0] and marker in cmdline:
                    pids.append(int(entry.name))
        return pids

    async def close(self) -> None:
        """Stop every node, kill what is left of them, delete their files. Never raises."""
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(Exception):
                    await self.ctl(node, "stop", timeout=30)
        for pid in self._own_beams():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(Exception):
                    node.proc.kill()
                    node.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
