"""Which instances serve now, in one book: each process's last beat, the instances that are down (dead
and being restarted, or frozen: one of their processes silent past `deadlines.heartbeat`), and those
that have reported since they last came up (what `/health` calls ready).

The book decides; the scheduler core acts (failing the requests of an instance that went down, taking
a restarted one back into routing). Listeners hear of every instance that goes down or leaves, so that
what other parts keep about it (a cache index) can be forgotten."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdpipe.config import tp_group_of

WATCHED = ("prefill", "decode", "mixed", "transfer")  # roles whose silence takes them out of routing


@dataclass
class Down:
    role: str
    machine: str
    frozen: bool = False  # alive to the launcher, but silent: it rejoins when it beats again


class Liveness:
    def __init__(self, limit: float, clock: Callable[[], float]):
        self.limit, self.clock = limit, clock
        self.heard: dict[str, float] = {}  # a process (or a rank, "decode-0.rank1") → its last beat
        self.silent: set[str] = set()  # processes past the limit since their last beat
        self.down: dict[str, Down] = {}  # instance (or transfer process) → why it is out
        self.reported: dict[str, float] = {}  # instance → when its latest stats came, since it last came up
        self.listeners: list[Callable[[str], None]] = []  # called with an instance that went down or left

    def is_down(self, name: str) -> bool:
        return name in self.down

    def is_frozen(self, name: str) -> bool:
        return name in self.down and self.down[name].frozen

    def ready(self, name: str) -> bool:
        """Reported since it last came up, and not down now."""
        return name in self.reported and name not in self.down

    def went_down(self, name: str, role: str, machine: str, frozen: bool = False) -> None:
        """`name` is out of routing. A frozen instance that dies stays down, no longer frozen: the
        launcher brings it back, and its ranks' silence is forgotten."""
        was = self.down.get(name)
        if was is not None and was.frozen and not frozen:
            self.silent = {n for n in self.silent if tp_group_of(n)[0] != name}
        self.down[name] = Down(role, machine, frozen)
        self.reported.pop(name, None)
        self.left(name)

    def came_up(self, name: str) -> Down | None:
        """A restarted (or unfrozen) process is back: what it was, or None if it was not down. Its next
        stats make it ready; its first beat may come after this."""
        if name in self.heard:
            self.heard[name] = self.clock()
        return self.down.pop(name, None)

    def left(self, name: str) -> None:
        """`name` is down or gone from the cluster: listeners forget it."""
        self.reported.pop(name, None)
        for listener in self.listeners:
            listener(name)

    def beat(self, name: str) -> str | None:
        """A beat from a process (or a rank, which speaks for its instance). Returns the instance that
        rejoins: frozen, and none of its processes silent any more."""
        self.heard[name] = self.clock()
        if name not in self.silent:
            return None
        self.silent.discard(name)
        instance = tp_group_of(name)[0]
        if self.is_frozen(instance) and not any(tp_group_of(n)[0] == instance for n in self.silent):
            return instance
        return None

    def report(self, name: str) -> bool:
        """Stats from `name`: it is ready unless down (the last words of a dead instance, or a restarted
        one not yet said to be back). Returns whether they count."""
        if name in self.down:
            return False
        self.reported[name] = self.clock()
        return True

    def newly_silent(self, role_of: Callable[[str], str]) -> list[tuple[str, str, str]]:
        """Processes of a watched role silent past the limit since the last call: for each, (the
        instance it takes down, its role, why) when that instance is not down already."""
        now, frozen = self.clock(), {}
        for name, when in list(self.heard.items()):
            instance = tp_group_of(name)[0]  # a silent rank takes its instance with it
            role = role_of(instance)
            if now - when > self.limit and name not in self.silent and role in WATCHED:
                self.silent.add(name)
                if instance not in self.down and instance not in frozen:  # once, however many ranks fell silent
                    what = f"{name}: no report" if name != instance else "no report"
                    frozen[instance] = (instance, role, f"{what} for {self.limit:g} s")
        return list(frozen.values())
