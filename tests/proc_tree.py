"""/proc helpers shared by the reward tests (no psutil needed)."""

from tradojax.rewards.sandbox import live_parents


def descendants(root: int) -> set[int]:
    """Live descendants of `root`, from /proc."""
    parent_of = live_parents()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parent_of.items() if parent in frontier} - found
        found |= frontier
    return found
