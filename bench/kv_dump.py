"""Reads what `psa_accuracy --dump_dir DIR` writes, for the offline studies
(rank_study.py, stop_study.py): the dense trajectory's decode queries and
the keys, one decode task (one layer, one KV head, its GQA group of query
heads) at a time, with each block's exact attention mass.
"""
import sys

import numpy as np

B = 16  # keys per block


def lse(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def add_arguments(ap, context=8192):
    ap.add_argument("dump_dir")
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--group", type=int, required=True, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, required=True)


def tasks(a, every):
    """Every `every`-th task of context a.context: a dict with
    layer, q [G][D], scale, kc (candidate blocks' keys [cand][B][D]: all but
    the first and the newest full block), share ([G][cand] each candidate's
    exact share of the head's attention mass), forced ([G] the share of the
    always-attended blocks and the partial tail), n_blocks and n_forced."""
    L, H, G, D = a.layers, a.kv_heads, a.group, a.head_dim
    keys = np.fromfile(f"{a.dump_dir}/keys_{a.context}.bin", dtype=np.float16)
    keys = keys.astype(np.float32).reshape(L, H, -1, D)
    raw = open(f"{a.dump_dir}/queries.bin", "rb").read()
    rec = 16 + G * D * 4
    if len(raw) % rec:
        sys.exit(f"queries.bin is not a whole number of {rec}-byte records: wrong --group or --head-dim?")
    scale = 1 / np.sqrt(D)
    for i in range(0, len(raw) // rec, every):
        ctx, l, h, n = np.frombuffer(raw, dtype=np.int32, count=4, offset=i * rec)
        if ctx != a.context:
            continue
        q = np.frombuffer(raw, dtype=np.float32, count=G * D, offset=i * rec + 16).reshape(G, D)
        nb = n // B
        kb = keys[l, h, : nb * B].reshape(nb, B, D)
        exact = lse(np.einsum("gd,cbd->gcb", q, kb) * scale, 2)  # [G][block] log-mass
        rest = keys[l, h, nb * B : n] @ q.T * scale
        total = np.logaddexp(lse(exact, 1), lse(rest.T, 1)) if rest.size else lse(exact, 1)
        forced = np.exp(exact[:, 0] - total) + np.exp(exact[:, nb - 1] - total)
        if rest.size:
            forced += np.exp(lse(rest.T, 1) - total)
        yield dict(layer=int(l), kv_head=int(h), n_keys=int(n), q=q, scale=scale, kc=kb[1 : nb - 1],
                   share=np.exp(exact[:, 1 : nb - 1] - total[:, None]), exact=exact[:, 1 : nb - 1],
                   forced=forced, n_blocks=nb + (1 if rest.size else 0),
                   n_forced=2 + (1 if rest.size else 0))
