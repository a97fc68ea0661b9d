"""Policies, selectable by name, as restrictions of the option set the solver may pick from.

Every policy gets the same per-option (f, p) solver, so a comparison isolates what each one
is allowed to choose: `joint` everything, `device-only` split = L, `server-only` split = 0,
`fixed-split` one option fixed once from the build-time profile (Neurosurgeon-style).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from edgetok.agent.coordinator.model import Environment, OptionTable, evaluate
from edgetok.agent.coordinator.solver import privacy_mask
from edgetok.control import POLICY_NAMES, PolicyName

log = logging.getLogger(__name__)

# Neurosurgeon (Kang et al., ASPLOS 2017) ships uncompressed activations; fp32 is that choice.
FIXED_SPLIT_PRECISION = "fp32"


class PolicyError(ValueError):
    """A policy name is unknown or cannot be met (e.g. server-only under a privacy floor)."""


@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """A named policy and the options it allows (already within the privacy floor)."""

    name: PolicyName
    allowed: np.ndarray = field(repr=False)


def _fixed_split(table: OptionTable, nominal: Environment) -> np.ndarray:
    """The latency-optimal split of the least-pruned model at full clock and power."""
    base = table.ratio == table.ratio.min()
    prec = np.array([o.precision == FIXED_SPLIT_PRECISION or o.split == table.num_layers
                     for o in table.options])
    cand = np.flatnonzero(base & prec & privacy_mask(table, nominal))
    if cand.size == 0:
        raise PolicyError("fixed-split: no unpruned fp32 option within the privacy floor")
    latency, _ = evaluate(table, nominal, np.full(len(table.options), nominal.f_max_hz),
                          np.full(len(table.options), nominal.p_max_w))
    best = int(cand[np.argmin(latency[cand])])
    log.info("fixed-split chose %s (%.2f ms at nominal link)", table.options[best].variant,
             latency[best] * 1e3)
    mask = np.zeros(len(table.options), dtype=bool)
    mask[best] = True
    return mask


def make_policy(name: str, table: OptionTable, nominal: Environment) -> Policy:
    """Build a policy by name; `nominal` is the build-time view fixed-split decides on."""
    privacy = privacy_mask(table, nominal)
    if name == "joint":
        allowed = privacy
    elif name == "device-only":
        allowed = privacy & (table.split == table.num_layers)
    elif name == "server-only":
        if nominal.privacy_min_split > 0:
            raise PolicyError("server-only sends raw tokens, which privacy_min_split = "
                              f"{nominal.privacy_min_split} forbids")
        allowed = table.split == 0
    elif name == "fixed-split":
        allowed = _fixed_split(table, nominal)
    else:
        raise PolicyError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    if not allowed.any():
        raise PolicyError(f"policy {name} allows no option of bundle {table.bundle}")
    return Policy(name=name, allowed=np.asarray(allowed))  # type: ignore[arg-type]
