"""The KV cache's rows as slots: which tokens each row holds, so a new request can reuse the longest prefix."""

from dataclasses import dataclass, field


@dataclass
class Slot:
    """One row of the KV cache: the tokens whose keys and values it holds (positions 0..len-1), and its user."""

    index: int
    held: list[int] = field(default_factory=list)
    request: object | None = None  # the Request decoding in this row, None while the row is free
    last_used: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """Returns the length of the longest common prefix of a and b."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SlotTable:
    """Free and busy rows; a request takes the free row that already holds the longest prefix of its prompt."""

    def __init__(self, n_slots: int):
        self.slots = [Slot(i) for i in range(n_slots)]
        self.clock = 0

    def free(self) -> list[Slot]:
        return [s for s in self.slots if s.request is None]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.request is not None]

    def take(self, prompt: list[int], request: object) -> tuple[Slot, int]:
        """Gives request the best free slot; returns it and how many prompt tokens it already holds (the last prompt
        token is always run again: its logits pick the first new token). Ties go to the least recently used."""
        self.clock += 1
        best = max(self.free(), key=lambda s: (min(common_prefix(s.held, prompt), len(prompt) - 1), -s.last_used))
        reused = min(common_prefix(best.held, prompt), len(prompt) - 1)
        best.held, best.request, best.last_used = best.held[:reused], request, self.clock
        return best, reused

    def release(self, slot: Slot, held: list[int]) -> None:
        """Frees a slot, remembering the tokens now in its cache row (empty when its contents are unknown)."""
        slot.request, slot.held = None, held
