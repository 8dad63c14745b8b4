"""A test host of our own: a network namespace joined to this machine by a veth pair.

    host = TestHost.create("pwpart")   # namespace pwpart<pid>, 10.200.N.1 (here) <-> .2 (there)
    subprocess.Popen(host.exec_argv([sys.executable, "-m", "persister", "run", ...]))
    host.cut()            # the link goes silent both ways (or "down", see below)
    host.restore()
    host.destroy()        # idempotent; also run by `remove_stale` for crashed runs

The /30 is private and made here; nothing routes beyond it: the namespace has
no default route and this machine does not forward, so processes inside can
reach exactly one address, the host end of the pair. Nothing ever sends to
any other address.

Two ways to cut:

- "silent" (default): both ends get a permanent neighbour entry with a MAC
  that is nobody's, so every frame is delivered to the other end and dropped
  there as not addressed to it. Links and routes stay up and no side gets an
  error: like a switch that stopped forwarding. Only TCP timeouts notice.
- "down": the namespace's end is set down. Inside, routes vanish and sends
  fail at once (ENETUNREACH); outside, frames are dropped silently.

Needs root and iproute2's `ip`; `unavailable()` says why not, for skipping.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

CutMode = Literal["silent", "down"]

# A locally administered unicast MAC that no interface here has.
NOBODY_MAC = "02:00:5e:00:de:ad"
SUBNET_POOL = ipaddress.IPv4Network("10.200.0.0/16")
IP_TIMEOUT_S = 10.0


class NetnsError(RuntimeError):
    pass


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    probe = f"pwprobe{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        ip("netns", "del", probe)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(prefix: str) -> list[str]:
    """Delete namespaces `<prefix><pid>` (and their veths) left by dead test runs."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(rf"{re.escape(prefix)}(\d+)", name)
        if match and not _pid_alive(int(match.group(1))):
            TestHost(name, *_veth_names(match.group(1)), "", "", 30).destroy()
            removed.append(name)
    return removed


def _veth_names(tag: str) -> tuple[str, str]:
    return f"pwp{tag}h", f"pwp{tag}n"  # at most 15 characters for a 7-digit pid


def _used_networks() -> list[ipaddress.IPv4Network]:
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in ip("-4", "-o", "addr", "show", check=False).splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            used.append(ipaddress.ip_interface(match.group(1)).network)
    for line in ip("-4", "route", "show", "table", "all", check=False).splitlines():
        first = line.split()[0] if line.split() else ""
        with contextlib.suppress(ValueError):
            if first not in ("default", "local", "broadcast", "unreachable", "blackhole"):
                used.append(ipaddress.ip_network(first, strict=False))
    return [n for n in used if isinstance(n, ipaddress.IPv4Network)]


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates = list(SUBNET_POOL.subnets(new_prefix=30))
    for k in range(len(candidates)):
        subnet = candidates[(seed + k) % len(candidates)]
        if not any(subnet.overlaps(u) for u in used):
            return subnet
    raise NetnsError("no free /30 in 10.200.0.0/16")


@dataclass
class TestHost:
    """One namespace, one veth pair, one /30 between them."""

    __test__ = False  # not a pytest test class

    netns: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str
    prefixlen: int
    cut_mode: CutMode | None = None

    @classmethod
    def create(cls, prefix: str) -> TestHost:
        """Namespace `<prefix><pid>`; `remove_stale(prefix)` finds it if we die."""
        tag = str(os.getpid())
        netns = f"{prefix}{tag}"
        subnet = _free_subnet(os.getpid())
        host_addr, ns_addr = (str(a) for a in list(subnet.hosts())[:2])
        host = cls(netns, *_veth_names(tag), host_addr, ns_addr, subnet.prefixlen)
        try:
            ip("netns", "add", netns)
            ip("link", "add", host.host_if, "type", "veth", "peer", "name", host.ns_if)
            ip("link", "set", host.ns_if, "netns", netns)
            ip("addr", "add", f"{host_addr}/{subnet.prefixlen}", "dev", host.host_if)
            ip("link", "set", host.host_if, "up")
            ip("link", "set", "lo", "up", netns=netns)
            ip("addr", "add", f"{ns_addr}/{subnet.prefixlen}", "dev", host.ns_if, netns=netns)
            ip("link", "set", host.ns_if, "up", netns=netns)
        except BaseException:
            host.destroy()
            raise
        return host

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def _mac(self, interface: str, netns: str | None) -> str:
        out = ip("-o", "link", "show", interface, netns=netns)
        match = re.search(r"link/ether (\S+)", out)
        if not match:
            raise NetnsError(f"no MAC for {interface}: {out}")
        return match.group(1)

    def cut(self, mode: CutMode = "silent") -> None:
        if mode == "silent":
            ip("neigh", "replace", self.ns_addr, "lladdr", NOBODY_MAC, "dev", self.host_if,
               "nud", "permanent")  # fmt: skip
            ip("neigh", "replace", self.host_addr, "lladdr", NOBODY_MAC, "dev", self.ns_if,
               "nud", "permanent", netns=self.netns)  # fmt: skip
        else:
            ip("link", "set", self.ns_if, "down", netns=self.netns)
        self.cut_mode = mode

    def restore(self) -> None:
        if self.cut_mode == "silent":
            # Correct entries at once rather than a flush: no ARP round to wait for.
            ns_mac, host_mac = self._mac(self.ns_if, self.netns), self._mac(self.host_if, None)
            ip("neigh", "replace", self.ns_addr, "lladdr", ns_mac, "dev", self.host_if,
               "nud", "reachable")  # fmt: skip
            ip("neigh", "replace", self.host_addr, "lladdr", host_mac, "dev", self.ns_if,
               "nud", "reachable", netns=self.netns)  # fmt: skip
        elif self.cut_mode == "down":
            ip("link", "set", self.ns_if, "up", netns=self.netns)
        self.cut_mode = None

    def destroy(self) -> None:
        """Remove the veth pair and the namespace; safe to call twice."""
        # Deleting one end of a veth pair deletes both; the namespace's end
        # also goes with the namespace.
        with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
            ip("link", "del", self.host_if, check=False)
        with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
            ip("netns", "del", self.netns, check=False)
