"""analyze: find the groups of coupled channels.

Every dimension of every tensor in the graph (and of every parameter) is a *space*; each of its
positions is one element with a global number. Op rules (passes/rules) say which elements are
the same channel. Connected components of that relation are the units that must be removed
together; components that touch the same spaces the same number of times form one
`ChannelGroup` (e.g. the 64 components of a conv's 64 output channels), ordered by position.

Reshapes that split one dim into several (heads, channel shuffle) or merge several into one
(flatten) can carry channels through only one sub-dim. Phase 1 builds every other map and looks
which sub-dims already reach parameters; each such reshape then carries the sub-dim that does
(else the largest), the others are pinned, and phase 2 builds the final components. Attention
heads come first (`heads`, the default): a split of q/k/v projections into (heads, head width)
carries whole heads, so the group's channels are heads, each spanning its head width in the q,
k, v and output projections; with grouped-query attention, whole key/value groups with their
query heads (`_resolve_choices`).

Assumes the trace pass recorded every node's value. Groups without a producing parameter (conv
output rows, linear rows, norm affine, embeddings) are not reported: nothing could remove them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import pcompiler.passes.rules  # noqa: F401  (registers the op rules)
from pcompiler.errors import CompileError
from pcompiler.ir import (
    Analysis,
    ChannelGroup,
    DimRef,
    ParamSlice,
    Program,
    Role,
    SpaceSlice,
    kept_by_zeroing,
    tensor_at,
    tensor_of,
)
from pcompiler.passes.rules.base import Choice, RuleContext, RuleError, lookup, target_name
from pcompiler.passmanager import ANALYSIS, PassResult, register_pass

log = logging.getLogger("pcompiler")

ATTENTION = ("heads", "head_dim")  # how attention shrinks: whole heads, or every head narrower
INPUT_REASON = "comes from a model input (the interface stays)"
OUTPUT_REASON = "reaches a model output (the interface stays)"
_ROLE_RANK = {Role.PRODUCE: 3, Role.TIED: 2, Role.CONSUME: 1}


class _State:
    """Spaces, element links, pins and roles collected from the rules."""

    def __init__(self, gm: fx.GraphModule, prune_normalized: bool = False):
        self.gm = gm
        self.prune_normalized = prune_normalized
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.tensors: dict[str, torch.Tensor] = {
            **dict(gm.named_parameters(remove_duplicate=False)),
            **dict(gm.named_buffers(remove_duplicate=False)),
        }
        self.space_id: dict[DimRef, int] = {}
        self.refs: list[DimRef] = []
        self.sizes: list[int] = []
        self.bases: list[int] = []
        self.n = 0
        self.links_a: list[np.ndarray] = []
        self.links_b: list[np.ndarray] = []
        self.pins: list[tuple[int, str]] = []
        self.approx: list[tuple[int, str]] = []  # removable, but not exactly (docs/design.md, "The rewrite and its proof")
        self.roles: dict[DimRef, str] = {}
        self.choices: list[Choice] = []
        self.heads: list[int] = []

    def tensor(self, qualname: str) -> torch.Tensor:
        t = self.tensors.get(qualname)
        if t is None:  # a plain tensor attribute (fx keeps constants so)
            t = self.tensors[qualname] = tensor_of(self.gm, qualname)
        return t

    def size_of(self, ref: DimRef) -> int:
        if ref in self.space_id:
            return self.sizes[self.space_id[ref]]
        if ref.param is not None:
            return int(self.tensor(ref.param).shape[ref.dim])
        t = tensor_at(self.nodes[ref.node], ref.path)
        if t is None:
            raise RuleError(f"'{ref.node}' has no tensor value")
        return t.shape[ref.dim]

    def space(self, ref: DimRef) -> int:
        sid = self.space_id.get(ref)
        if sid is None:
            ref = self._canonical(ref)
            sid = self.space_id.get(ref)
        if sid is None:
            size = self.size_of(ref)
            sid = len(self.refs)
            self.space_id[ref] = sid
            self.refs.append(ref)
            self.sizes.append(size)
            self.bases.append(self.n)
            self.n += size
        return sid

    def _canonical(self, ref: DimRef) -> DimRef:
        """Dims of get_attr nodes' values are the parameter's own dims."""
        if ref.node is not None:
            node = self.nodes[ref.node]
            if node.op == "get_attr" and not ref.path:
                return DimRef(ref.dim, param=node.target)
        return ref

    def elements(self, ref: DimRef, idx: np.ndarray | None = None) -> np.ndarray:
        sid = self.space(ref)
        base, size = self.bases[sid], self.sizes[sid]
        if idx is None:
            return np.arange(base, base + size)
        if len(idx) and (idx.min() < 0 or idx.max() >= size):
            raise RuleError(f"index out of range for {ref} of size {size}")
        return base + idx

    def add_link(self, a: DimRef, ia: np.ndarray, b: DimRef, ib: np.ndarray) -> None:
        ea, eb = self.elements(a, ia), self.elements(b, ib)
        if ea.shape != eb.shape:
            raise RuleError(f"link between {a} and {b} pairs {len(ea)} with {len(eb)} positions")
        self.links_a.append(ea)
        self.links_b.append(eb)

    def add_pin(self, ref: DimRef, reason: str) -> None:
        self.pins.append((self.space(ref), reason))

    def add_approximate(self, ref: DimRef, reason: str, where: str) -> None:
        if self.prune_normalized:
            self.approx.append((self.space(ref), where))
        else:
            self.add_pin(ref, f"{reason} (--prune-normalized removes them approximately)")

    def set_role(self, ref: DimRef, role: str) -> None:
        ref = self._canonical(ref)
        if ref.param is None:
            raise RuleError(f"{ref} is not a parameter, so it cannot {role}")
        self.space(ref)
        old = self.roles.get(ref)
        if old is None or _ROLE_RANK[role] > _ROLE_RANK[old]:
            self.roles[ref] = role

    def add_head(self, ref: DimRef) -> None:
        self.heads.append(self.space(ref))

    def add_choice(self, choice: Choice) -> None:
        for r in (choice.single, *choice.multi):
            self.space(r)
        self.choices.append(choice)

    # ------------------------------------------------------------------------------------------
    def components(self) -> np.ndarray:
        if self.links_a:
            a, b = np.concatenate(self.links_a), np.concatenate(self.links_b)
        else:
            a = b = np.zeros(0, dtype=np.int64)
        m = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self.n, self.n))
        return connected_components(m, directed=False)[1]


def _visit(node: fx.Node, prog: Program, ctx: RuleContext, state: _State, notes: list) -> None:
    gm = prog.gm
    if node.op == "placeholder":
        ctx.pin_tensor(node, INPUT_REASON)
    elif node.op == "output":
        for inp in node.all_input_nodes:
            ctx.pin_tensor(inp, OUTPUT_REASON)
    elif node.op == "get_attr":
        t = tensor_at(node)
        if t is not None:
            for d in range(t.ndim):
                state.space(DimRef(d, param=node.target))
    elif node.op == "call_module" and node.target in prog.opaque:
        reason = f"passes opaque module '{node.target}' ({prog.opaque[node.target]})"
        ctx.pin_node(node, reason)
        notes.append((node.name, reason))
    else:
        key, op_rule = lookup(node, gm)
        touches_tensors = tensor_at(node) is not None or any(
            tensor_at(n) is not None for n in node.all_input_nodes
        )
        if op_rule is None:
            if touches_tensors or node.op == "call_module":
                reason = f"no rule for {target_name(key)} at node '{node.name}'"
                ctx.pin_node(node, reason)
                notes.append((node.name, reason))
            return
        try:
            op_rule.analyze(node, ctx)
        except RuleError as e:
            reason = f"{target_name(key)} at node '{node.name}': {e}"
            ctx.pin_node(node, reason)
            notes.append((node.name, reason))


def _component_flags(state: _State, labels: np.ndarray, sids: Iterable[int]) -> np.ndarray:
    """Per component: whether it holds an element of one of the spaces `sids`."""
    flags = np.zeros(labels.max() + 1 if len(labels) else 0, dtype=bool)
    sids = list(sids)
    if sids:
        flags[labels[np.concatenate([np.arange(state.bases[s], state.bases[s] + state.sizes[s]) for s in sids])]] = True
    return flags


def _resolve_choices(state: _State, heads: bool) -> np.ndarray:
    """Pick the sub-dim each split/merge carries channels through (see module docstring) and
    link it; returns the final component labels.

    By default the sub-dim whose channels reach a parameter, else the largest. With `heads`,
    first, in rounds: a sub-dim that holds attention heads (`RuleContext.head`) and is not
    pinned; where none does but the single dim does (a merge of key/value heads repeated for
    grouped-query attention: B x Hkv x n_rep -> B x H), its outermost sub-dim that is not pinned
    (the key/value heads). Each round's links can give heads to the next round's choices (the
    key/value projection's split sees the heads once the repeat's merge is linked)."""
    labels = state.components()
    pending = list(state.choices)
    while heads and pending and state.heads:
        marked = _component_flags(state, labels, state.heads)
        pinned = _component_flags(state, labels, {sid for sid, _ in state.pins})

        def has(flags: np.ndarray, ref: DimRef, labels: np.ndarray = labels) -> bool:
            return bool(flags[labels[state.elements(ref)]].any())

        decided, rest = [], []
        for c in pending:
            free = [i for i, m in enumerate(c.multi) if not has(pinned, m)]
            k = next((i for i in free if has(marked, c.multi[i])), None)
            if k is None and free and has(marked, c.single) and not has(pinned, c.single):
                k = free[0]
            (decided if k is not None else rest).append((c, k))
        if not decided:
            break
        for c, k in decided:
            _carry(state, c, k)
        pending = [c for c, _ in rest]
        labels = state.components()
    if not pending:
        return labels
    reaches = _component_flags(state, labels, [sid for sid, r in enumerate(state.refs) if r.param is not None])
    for c in pending:
        connected = [bool(reaches[labels[state.elements(m)]].any()) for m in c.multi]
        candidates = [i for i, ok in enumerate(connected) if ok] or list(range(len(c.multi)))
        _carry(state, c, max(candidates, key=lambda i: (c.sizes[i], -i)))  # largest; ties: outermost
    return state.components()


def _carry(state: _State, c: Choice, k: int) -> None:
    """Link `c.single` to sub-dim k of `c.multi` and pin the other sub-dims."""
    n = state.size_of(c.single)
    inner = int(np.prod(c.sizes[k + 1 :], dtype=np.int64))
    coord = (np.arange(n) // inner) % c.sizes[k]
    state.add_link(c.single, np.arange(n), c.multi[k], coord)
    shape = "x".join(map(str, c.sizes))
    for i, m in enumerate(c.multi):
        if i != k:
            state.add_pin(m, f"reshape at '{c.node}' splits channels {shape}; they follow the {c.sizes[k]}-wide sub-dim only")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a well-spread 64-bit hash of each integer."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(keys, return_counts=True), by a stable sort: timsort on the nearly sorted
    keys analysis makes is several times faster than unique's quicksort."""
    keys = np.sort(keys, kind="stable")
    first = np.nonzero(np.r_[True, keys[1:] != keys[:-1]])[0]
    return keys[first], np.diff(np.r_[first, len(keys)])


def _reasons_per_label(state: _State, labels: np.ndarray, interesting: np.ndarray,
                       items: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The (component label, reason number) pairs of `items` ((space, reason) pairs: pins or
    approximations) on the interesting components, found at once, and the reasons."""
    items = list(dict.fromkeys(items))  # the same pin often comes from several rules
    reasons = list(dict.fromkeys(reason for _, reason in items))
    if not items:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), reasons
    n_labels = max(int(labels.max()) + 1, 1)
    rid_of = {reason: i for i, reason in enumerate(reasons)}
    sids = np.asarray([sid for sid, _ in items], dtype=np.int64)
    rids = np.asarray([rid_of[reason] for _, reason in items], dtype=np.int64)
    n_elem = np.asarray(state.sizes, dtype=np.int64)[sids]
    item_of_elem = np.repeat(np.arange(len(items)), n_elem)
    first = np.repeat(np.asarray(state.bases, dtype=np.int64)[sids] - (np.cumsum(n_elem) - n_elem), n_elem)
    elem_lab = labels[first + np.arange(len(item_of_elem))]
    keep = interesting[elem_lab]
    pair = np.unique(item_of_elem[keep] * np.int64(n_labels) + elem_lab[keep])
    return pair % n_labels, rids[pair // n_labels], reasons


def _per_group(group_of_comp: np.ndarray, lab: np.ndarray, rid: np.ndarray, reasons: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for g, r in set(zip(group_of_comp[lab].tolist(), rid.tolist())):
        out.setdefault(g, []).append(reasons[r])
    return out


def _build_groups(state: _State, labels: np.ndarray) -> tuple[ChannelGroup, ...]:
    n_labels = labels.max() + 1 if len(labels) else 0
    sizes = np.asarray(state.sizes, dtype=np.int64)
    space_of = np.repeat(np.arange(len(sizes)), sizes)

    produce = [state.elements(r) for r, role in state.roles.items() if role == Role.PRODUCE]
    interesting = np.zeros(n_labels, dtype=bool)
    if produce:
        interesting[labels[np.concatenate(produce)]] = True

    pin_l, pin_r, reasons = _reasons_per_label(state, labels, interesting, state.pins)
    pinned = np.zeros(n_labels, dtype=bool)
    pinned[pin_l] = True

    # Signature hash: the multiset of spaces a component touches, and whether it is pinned.
    mask = interesting[labels]
    elem = np.nonzero(mask)[0]
    lab, sp = labels[elem], space_of[elem]
    pair, counts = _counts(sp * np.int64(n_labels) + lab)  # sp is sorted: a stable sort is cheap
    with np.errstate(over="ignore"):
        h = _mix(pair // n_labels * np.int64(1_000_003) + counts)
        sig = np.zeros(n_labels, dtype=np.uint64)
        np.add.at(sig, pair % n_labels, h)
        sig ^= pinned.astype(np.uint64) * np.uint64(0x5BD1E995)

    comps = np.nonzero(interesting)[0]
    first_elem = np.full(n_labels, np.iinfo(np.int64).max)
    np.minimum.at(first_elem, lab, elem)
    comps = comps[np.argsort(first_elem[comps], kind="stable")]  # groups and channels in graph order
    uniq, first_pos, group_of = np.unique(sig[comps], return_index=True, return_inverse=True)
    order = np.argsort(first_pos, kind="stable")
    gid_of_sig = np.empty(len(uniq), dtype=np.int64)
    gid_of_sig[order] = np.arange(len(uniq))
    group_of_comp = np.full(n_labels, -1, dtype=np.int64)
    group_of_comp[comps] = gid_of_sig[group_of.ravel()]
    # Channel number within its group, in graph order.
    by_group = comps[np.argsort(group_of_comp[comps], kind="stable")]
    n_channels = np.bincount(group_of_comp[comps], minlength=len(uniq))
    group_start = np.r_[0, np.cumsum(n_channels)[:-1]]
    rank = np.zeros(n_labels, dtype=np.int64)
    rank[by_group] = np.arange(len(by_group)) - group_start[group_of_comp[by_group]]

    g_e = group_of_comp[lab]
    # Order by group, space, channel, then element (elem ascends: a stable sort keeps it).
    rank_e = rank[lab]
    sort = np.argsort((g_e * np.int64(len(sizes)) + sp) * (int(rank_e.max(initial=0)) + 1) + rank_e, kind="stable")
    g_e, sp_e, el_e = g_e[sort], sp[sort], elem[sort]
    cut = np.nonzero((np.diff(g_e) != 0) | (np.diff(sp_e) != 0))[0] + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(g_e)]

    heads = np.zeros(len(uniq), dtype=bool)  # groups whose channels are attention heads
    heads[group_of_comp[comps[_component_flags(state, labels, state.heads)[comps]]]] = True
    group_reasons = _per_group(group_of_comp, pin_l, pin_r, reasons)
    group_approx = _per_group(group_of_comp, *_reasons_per_label(state, labels, interesting, state.approx))

    params: dict[int, list[ParamSlice]] = {g: [] for g in range(len(uniq))}
    spaces: dict[int, list[SpaceSlice]] = {g: [] for g in range(len(uniq))}
    for s, e in zip(starts.tolist(), ends.tolist()):
        g, sid = int(g_e[s]), int(sp_e[s])
        ref = state.refs[sid]
        index = (el_e[s:e] - state.bases[sid]).reshape(int(n_channels[g]), -1)
        if ref.param is not None:
            role = state.roles.get(ref, Role.TIED)
            params[g].append(
                ParamSlice(ref.param, ref.dim, role, index, kept_by_zeroing(state.tensor(ref.param)), state.sizes[sid])
            )
        else:
            spaces[g].append(SpaceSlice(ref, index))

    return tuple(
        ChannelGroup(
            id=g,
            size=int(n_channels[g]),
            params=tuple(params[g]),
            spaces=tuple(spaces[g]),
            pinned=tuple(sorted(group_reasons.get(g, ()))),
            approximate=tuple(sorted(group_approx.get(g, ()))),
            heads=bool(heads[g]),
        )
        for g in range(len(uniq))
    )


def analyze_program(prog: Program, heads: bool = True, prune_normalized: bool = False) -> Analysis:
    """The channel groups of `prog`. `heads`: attention shrinks by whole heads where it can
    (else along the head width, as every split does by default). `prune_normalized`: channels
    that a LayerNorm normalizes are prunable, approximately (their groups' `approximate`)."""
    state = _State(prog.gm, prune_normalized)
    ctx = RuleContext(state, prog.gm)
    notes: list[tuple[str, str]] = []
    for node in prog.gm.graph.nodes:
        _visit(node, prog, ctx, state, notes)
    labels = _resolve_choices(state, heads) if state.choices else state.components()
    groups = _build_groups(state, labels)
    return Analysis(groups=groups, notes=tuple(notes))


@dataclass(frozen=True)
class Analyze:
    """Build the channel groups of the program (`prog.analysis`). `attention`: "heads" (the
    default) removes whole attention heads, "head_dim" narrows every head instead.
    `prune_normalized`: channels a LayerNorm normalizes may go, approximately (verify reports
    the deviation)."""

    name: ClassVar[str] = "analyze"
    requires: ClassVar = ()
    ensures: ClassVar = (ANALYSIS,)
    attention: str = "heads"
    prune_normalized: bool = False

    def run(self, prog: Program) -> PassResult:
        if self.attention not in ATTENTION:
            raise CompileError(f"unknown attention mode {self.attention!r}", hint=f"choose one of {', '.join(ATTENTION)}")
        analysis = analyze_program(prog, heads=self.attention == "heads", prune_normalized=self.prune_normalized)
        log.info(
            "analyze: %d groups, %d prunable, %d notes",
            len(analysis.groups), len(analysis.prunable), len(analysis.notes),
        )
        return PassResult(prog.replace(analysis=analysis, selection=None, scores=None), changed=False)


register_pass(Analyze)
analyze = Analyze
