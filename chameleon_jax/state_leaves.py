"""A train state carried between jitted steps as the plain list of its arrays.

Every call of a jitted step flattens its arguments and unflattens its results. A
train state built from Flax NNX variables flattens in Python, variable by variable:
for the Shapes tokenizer (about 190 arrays) on two CPU devices that is about 2 ms of
a 50 ms step, spent while the devices wait. A list of arrays flattens in JAX's C++
dispatch path. `StateLeaves` keeps the state between steps as that list and rebuilds
the structure inside the jitted step, where it costs nothing at run time: the
compiled program is the one the structured state gives, so the step computes
exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class StateLeaves:
    """The structure of a state whose leaves travel between steps as a list.

    `pack(state)` gives the list, `unpack(leaves)` the state, and `step(fn)` turns
    `fn(state, *args) -> (state, out)` into `(leaves, *args) -> (leaves, out)`, to jit. A
    sharding for the whole state applies to the list as it is; a tree of per-leaf shardings
    goes through `pack` too.
    """

    treedef: Any

    @classmethod
    def of(cls, tree) -> "StateLeaves":
        """The layout of `tree` (a state, or its `jax.eval_shape`)."""
        return cls(jax.tree.structure(tree))

    def pack(self, tree) -> list:
        return self.treedef.flatten_up_to(tree)

    def unpack(self, leaves) -> Any:
        if len(leaves) != self.treedef.num_leaves:
            raise ValueError(f"expected {self.treedef.num_leaves} state arrays, got {len(leaves)}")
        return self.treedef.unflatten(leaves)

    def step(self, fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
        def leaves_fn(leaves, *args):
            state, out = fn(self.unpack(leaves), *args)
            return self.pack(state), out

        return leaves_fn
