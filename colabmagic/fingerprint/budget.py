"""How a query spends its posting budget: a sample of its hashes, and the speed probe.

Every budgeted lookup of the match path (:mod:`colabmagic.fingerprint.match`) takes a query's
hashes in one fixed pseudo-random order of hash values, in whole slices of it, until their
postings reach the budget (:func:`spend_sampled`). Not rarest first: on a large index of game
music the hashes a query shares with its recording recur in the recording's copies and loops, so
its rarest hashes are the ones least likely to hit it (noise makes rare hashes; see
docs/fingerprint.md, "At scale").

A query that finds nothing at the unchanged speed is hashed under six other speed hypotheses.
Splitting one budget six ways gives the right one a sixth of it, so the speed stage probes
first: every (query, hypothesis) spends a small budget of its own, the most hits aligned in one
(track, offset) bin ranks the hypotheses (:func:`best_bin_counts`), and the full budget then goes
to the best ones only.
"""

from __future__ import annotations

from typing import Any

#: Multiplier of the hash-value order (Knuth's multiplicative hash): a fixed pseudo-random order
#: over hash values, the same for every query and batch.
_MIX = 2654435761
#: The order is spent in whole slices of it, this many (a per-group cap found by one
#: ``bincount``, no sort; a slice holds a few hashes of a 10 s query's hypothesis).
SLICES = 256


def spend_sampled(xp: Any, group: Any, hashes: Any, postings: Any, budget: int, stop: int) -> Any:
    """Which hashes a posting *budget* looks up (bool mask), per *group*, in a fixed
    pseudo-random order of hash values, in whole slices of it (:data:`SLICES`), while their
    postings add up to at most *budget*.

    Parameters
    ----------
    xp : module
        The array namespace (NumPy or CuPy).
    group : array of int
        Which budget each hash spends (a query, or a query and speed hypothesis).
    hashes : array of uint32
        The hash values, which set the order.
    postings : array of int
        Postings of each hash in the index; 0 or more than *stop* is never looked up.
    budget : int
        Posting hits per group.
    stop : int
        The index's stop list.

    Returns
    -------
    array of bool
        The hashes to look up: per group, every hash of the first slices of the order whose
        postings fit, so one group's choice does not depend on the others'.
    """
    if postings.shape[0] == 0:
        return xp.zeros(0, dtype=bool)
    cost = xp.where(postings <= stop, postings, 0).astype(xp.int64)
    part = slice_of(xp, hashes)
    n_g = int(group.max()) + 1
    spent = xp.bincount(
        group.astype(xp.int64) * SLICES + part, weights=cost.astype(xp.float64),
        minlength=n_g * SLICES,
    ).reshape(n_g, SLICES)  # fmt: skip
    fits = xp.cumsum(spent, axis=1) <= budget  # a run of True from slice 0
    last = fits.sum(axis=1) - 1  # the last slice that fits, with all before it
    return (cost > 0) & (part <= last[group])


def slice_of(xp: Any, hashes: Any) -> Any:
    """The slice of the hash-value order each hash falls in (:func:`spend_sampled`)."""
    mixed = (hashes.astype(xp.uint64) * xp.uint64(_MIX)) & xp.uint64(0xFFFFFFFF)
    return (mixed * xp.uint64(SLICES) >> xp.uint64(32)).astype(xp.int64)


def best_bin_counts(xp: Any, key: Any, span: int, n_groups: int) -> Any:
    """Per group, the most hits that fall in one bin (0 for a group without hits).

    Parameters
    ----------
    xp : module
    key : array of int64
        The bin of each hit: ``group * span + bin``, with ``0 <= bin < span`` (the bin: a
        track and an offset) and ``group`` in ``[0, n_groups)``.
    span : int
        Bins per group.
    n_groups : int

    Returns
    -------
    array of int64, shape (n_groups,)
    """
    out = xp.zeros(n_groups, dtype=xp.int64)
    if key.shape[0] == 0:
        return out
    k = xp.sort(key)
    out[k // span] = 1
    repeat = xp.flatnonzero(k[1:] == k[:-1])  # the second and later hits of a bin
    if repeat.shape[0] == 0:
        return out
    # runs of equal keys among the repeats: a bin with n hits gives n - 1 of them in a row
    r = k[repeat + 1]
    new = xp.concatenate([xp.ones(1, dtype=bool), r[1:] != r[:-1]])
    starts = xp.flatnonzero(new)
    count = xp.diff(xp.concatenate([starts, xp.asarray([r.shape[0]], dtype=starts.dtype)])) + 1
    group = r[starts] // span
    by = xp.lexsort(xp.stack([count, group]))  # per group, its largest bin last
    g = group[by]
    last = xp.concatenate([g[1:] != g[:-1], xp.ones(1, dtype=bool)])
    out[g[last]] = count[by][last]
    return out
